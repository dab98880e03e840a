"""run/progress.py: bars on a terminal, plain lines in a file, in main.py and train_original.py."""
import re
import subprocess
import sys
from pathlib import Path


from run import progress


ROOT = Path(__file__).resolve().parents[1]
TINY = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8", "--num_samples=4",
        "--num_query_set=2", "--batch_size=4", "--model=gru4rec", "--gru4rec_hidden_size=8",
        "--gru4rec_embedding_dim=8", "--gru4rec_n_layers=1", "--lstm_hidden=8", "--lstm_input_size=4"]


def run_to_file(tmp_path, ratings_file, script, *flags, environment=None):
    """The script's whole output (standard output and error) written to a file, as under nohup."""
    log = tmp_path / "run.log"
    with open(log, "w") as output:
        subprocess.run([sys.executable, str(ROOT / script), f"--data_path={ratings_file}", *TINY, *flags],
                       stdout=output, stderr=subprocess.STDOUT, check=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **(environment or {})})
    with open(log, newline="") as written:   # '\r' kept as it is
        return written.read()


def test_a_meta_training_written_to_a_file_has_a_plain_line_per_validation_and_no_bar(ratings_file, tmp_path):
    text = run_to_file(tmp_path, ratings_file, "main.py", "--use_adaptive_loss=False", f"--log_dir={tmp_path}",
                       "--num_train_iterations=12", "--log_interval=4")
    assert "\r" not in text and "Iteration " not in text and "it/s" not in text
    validations = [line for line in text.splitlines() if "; validation RMSE" in line]
    assert [int(re.match(r"MAML iteration (\d+)/12, [\d.]+ s/iteration, about \S+ left; validation RMSE [\d.]+, "
                         r"best [\d.]+ at \d+$", line).group(1)) for line in validations] == [4, 8, 12]
    assert len(text.encode()) < 4000


def test_on_request_the_bars_form_writes_a_line_per_iteration(ratings_file, tmp_path):
    text = run_to_file(tmp_path, ratings_file, "main.py", "--use_adaptive_loss=False", f"--log_dir={tmp_path}",
                       "--num_train_iterations=6", "--log_interval=3", environment={"MELO_PROGRESS": "bars"})
    assert [int(n) for n in re.findall(r"^Iteration (\d+):", text, re.M)] == [1, 2, 3, 4, 5, 6]
    assert "; validation RMSE" not in text and "\r" in text


def test_basic_written_to_a_file_has_its_epoch_lines_and_no_bar(ratings_file, tmp_path):
    text = run_to_file(tmp_path, ratings_file, "train_original.py", f"--pretrain_log_dir={tmp_path}",
                       "--pretrain_epochs=3")
    assert "\r" not in text and "it/s" not in text
    assert [int(n) for n in re.findall(r"^Epoch (\d+):", text, re.M)] == [1, 2, 3]


def test_a_heartbeat_line_comes_at_most_every_interval(monkeypatch, capsys):
    clock = iter(range(0, 1000, 10))   # each look at the clock: 10 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv(progress.PROGRESS_VARIABLE, "lines")
    steps = list(progress.Progress("MELO", 1, 9))
    lines = capsys.readouterr().out.splitlines()
    assert steps == list(range(1, 10))
    # started at 0, then 10 s per step and per line: a line after 30 s, and again 30 s after that
    assert lines and all(re.match(r"MELO iteration \d/9, [\d.]+ s/iteration, about \d+m\d\ds left$", line)
                         for line in lines)
    assert len(lines) == 3
