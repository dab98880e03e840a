"""A study that cannot be fooled or run twice: records checked before they are trusted, one
invocation of a study at a time, no run deleted under a process that uses it, and no run that
outlives its study."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import report
import reproduce
from run.atomic_files import exclusive_lock
from run.errors import UserError
from study import records, study_options

ROOT = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--num_samples=4", "--num_query_set=2", "--batch_size=4", "--pretraining_batch_size=16",
             "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8", "--gru4rec_n_layers=1",
             "--lstm_hidden=8", "--lstm_input_size=4"]


def study_argv(ratings_file, results_dir, *extra, iterations=2):
    return [f"--data_path={ratings_file}", "--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8",
            "--pretrain_epochs=1", f"--num_train_iterations={iterations}", "--log_interval=1", "--models", "gru4rec",
            "--name=safe", f"--results_dir={results_dir}", *extra, "--", *RUN_FLAGS]


# --- records checked before they are trusted --------------------------------------------------------
def test_a_results_json_with_an_edited_rmse_is_refused_naming_the_run(tmp_path):
    recorded = json.loads((ROOT / "results" / "ml-100k-controls" / "results.json").read_text())
    melo = next(record for record in recorded["runs"] if record["method"] == "melo")
    melo["metrics"]["rmse"] = 0.5
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"results.json: the RMSE of melo \(seed 222\) is 0.5000, but its per-user "
                                        r"errors give 0.9956: it was edited or damaged; take it again from git"):
        report.render(tmp_path / "results.json")
    assert not (tmp_path / "table.md").exists()


def test_a_results_json_edited_elsewhere_is_refused_by_its_checksum(tmp_path):
    recorded = json.loads((ROOT / "results" / "ml-100k-controls" / "results.json").read_text())
    recorded = records.with_checksum(recorded)
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    report.render(tmp_path / "results.json")                   # as written: accepted
    recorded["runs"][3]["checkpoint_step"] = 12345
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="results.json was edited or damaged: its content does not match the checksum"):
        report.render(tmp_path / "results.json")


@pytest.mark.parametrize("edit", ["rmse", "checkpoint_step"])
def test_a_finished_runs_edited_record_is_refused_not_reused(tmp_path, ratings_file, edit):
    study = study_options.parse_command_line(study_argv(ratings_file, tmp_path))
    run = next(run for run in reproduce.plan_runs(study, tmp_path / "safe" / "runs") if run.method == "maml")
    record = {"seed": 222, "model": "gru4rec", "method": "maml", "checkpoint_step": 2, "curve": None,
              "metrics": {"rmse": 0.5, "mae": 0.5, "per_user": {"user": [1, 2], "squared_error": [0.16, 0.34],
                                                              "absolute_error": [0.4, 0.6]}}}
    run.folder.mkdir(parents=True)
    run.record_path.write_text(json.dumps(records.with_checksum(record)))
    assert reproduce.finished_record(run) == record
    edited = records.with_checksum(record)
    if edit == "rmse":
        edited["metrics"]["rmse"] = 0.4
        del edited["sha256"]                    # a record of an earlier version: its numbers are checked
        expected = r"maml.json: the RMSE of maml \(seed 222\) is 0.4000, but its per-user errors give 0.5000"
    else:
        edited["checkpoint_step"] = 1
        expected = "maml.json was edited or damaged: its content does not match the checksum"
    run.record_path.write_text(json.dumps(edited))
    with pytest.raises(UserError, match=f"{expected}.*delete it to run seed 222 gru4rec MAML again"):
        reproduce.finished_record(run)


def test_runs_made_from_other_data_are_neither_pooled_nor_continued(tmp_path, ratings_file):
    """A study moved to a machine whose CPU orders same-date ratings otherwise: its runs were
    made from other sequences than this machine makes, and two machines' runs never pool."""
    study = study_options.parse_command_line(study_argv(ratings_file, tmp_path))
    runs = {run.method: run for run in reproduce.plan_runs(study, tmp_path / "safe" / "runs") if run.model}
    for method, made_from in (("maml", "a" * 16), ("melo", "b" * 16)):
        record = {"seed": 222, "model": "gru4rec", "method": method, "checkpoint_step": 2, "curve": None,
                  "data_digest": made_from, "metrics": {"rmse": 0.5, "mae": 0.5}}
        runs[method].folder.mkdir(parents=True, exist_ok=True)
        runs[method].record_path.write_text(json.dumps(records.with_checksum(record)))
    with pytest.raises(UserError, match=f"holds runs made from 2 data sets \\({'a' * 16}, {'b' * 16}\\).*"
                                        "--stable_date_sort=True.*cannot be pooled"):
        reproduce.main(study_argv(ratings_file, tmp_path, "--report_finished"))
    runs["melo"].record_path.unlink()
    reported = reproduce.main(study_argv(ratings_file, tmp_path, "--report_finished"))  # one data set: reported
    assert reported == [] and "| 222 | GRU4Rec | MAML | 0.5000 | 2 |  |" in (tmp_path / "safe" / "table.md").read_text()
    with pytest.raises(UserError, match=f"made from other data \\(digest {'a' * 16}\\) than this machine makes "
                                        r"of them \(\w{16}\)"):
        reproduce.main(study_argv(ratings_file, tmp_path))
    assert not (runs["basic"].folder / "basic").exists()          # refused before any run started


# --- one invocation at a time, nothing deleted under a running process ---------------------------------
def test_a_second_invocation_of_a_running_study_stops_at_once_and_deletes_nothing(tmp_path, ratings_file):
    runs = tmp_path / "safe" / "runs"
    (runs / "222" / "gru4rec" / "basic").mkdir(parents=True)
    (runs / "222" / "gru4rec" / "basic" / "in_use").write_text("another study's file")
    with exclusive_lock(runs / ".study.lock"):
        before = sorted(path for path in tmp_path.rglob("*"))
        with pytest.raises(UserError, match=rf"the study safe is running already \(pid {os.getpid()} on .*; wait for "
                                            "it to end, or see what it has finished with --report_finished"):
            reproduce.main(study_argv(ratings_file, tmp_path))
    assert sorted(path for path in tmp_path.rglob("*")) == before


def test_a_run_folder_in_use_by_a_process_is_reported_not_deleted(tmp_path, ratings_file):
    argv = study_argv(ratings_file, tmp_path)
    basic = next(run for run in reproduce.plan_runs(study_options.parse_command_line(argv), tmp_path / "safe" / "runs")
                 if run.method == "basic")
    folder = basic.files.folder                  # a Basic left running by a killed study: no checkpoint yet
    folder.mkdir(parents=True)
    (folder / "state").mkdir()
    with exclusive_lock(folder / ".basic.lock"):
        with pytest.raises(UserError, match=rf"seed 222 gru4rec Basic: .* is in use by a run \(pid {os.getpid()} on "
                                            r".*stop it \(kill that pid\)"):
            reproduce.main(argv)
        assert (folder / "state").is_dir() and (folder / ".basic.lock").is_file()


# --- no run outlives its study -------------------------------------------------------------------------
def processes_under(folder):
    """Live processes whose command line names ``folder`` (Linux's /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]:
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent's death signal is Linux's")
def test_a_study_killed_with_sigkill_takes_its_runs_with_it(tmp_path, ratings_file):
    argv = study_argv(ratings_file, tmp_path, "--jobs", "2", iterations=100000)
    study = subprocess.Popen([sys.executable, "-u", str(ROOT / "reproduce.py"), *argv], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in study.stdout:
        if "MELO: training" in line:             # MAML and MELO are running, one thread each
            break
    log = tmp_path / "safe" / "runs" / "222" / "gru4rec" / "melo.log"
    deadline = time.monotonic() + 60
    while "validation RMSE" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    runs = [pid for pid in processes_under(tmp_path) if pid != study.pid]
    assert len(runs) == 2
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.monotonic() + 30
    while processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(tmp_path) == []
    assert "SIGUSR1: the run stopped after iteration" in log.read_text()   # each run checkpointed and stopped
    shutil.rmtree(tmp_path / "safe")
