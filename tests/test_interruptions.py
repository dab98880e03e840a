"""Runs that a cluster stops, that run twice at once, that meet a full disk, and files that
are damaged: preemption checkpoints that resume exactly, one writer per run, one-line errors
that leave nothing partial, and nothing damaged ever used."""
import errno
import json
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from config import RunFilesConfig
from dataloader import DataError
from fixtures import run_dir, write_ratings
import main
from options import parse_args
import reproduce
from run import atomic_files
from run.atomic_files import load_checked, save_checked
from run.errors import UserError
from run.preemption import PREEMPTED_STATUS, Preempted
from run.run_files import RunFiles, pretrained_paths
from study import study_options
import train_original

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8", "--num_samples=4",
        "--num_query_set=2", "--batch_size=4", "--bert_hidden_units=8", "--bert_num_blocks=1",
        "--bert_num_heads=2", "--lstm_hidden=8", "--lstm_input_size=4", "--pretraining_batch_size=16"]
META = ["--num_train_iterations=6", "--log_interval=4", "--multi_step_loss_num_epochs=3"]


def flags(ratings_file, root, *extra):
    return [f"--data_path={ratings_file}", *TINY, f"--log_dir={root / 'log'}", f"--pretrain_log_dir={root / 'pre'}",
            *extra]


def signal_at(monkeypatch, owner, method, count, number=signal.SIGTERM):
    """Send ``number`` to this process during the ``count``-th call of ``owner.method``."""
    original, calls = getattr(owner, method), []

    def signalling(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), number)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, signalling)


def learner_of(root, step, method="melo"):
    return load_checked(run_dir(root / "log") / "state" / f"bert4rec_{step}_ml-1m_{method}.pt",
                        weights_only=False)["learner"]


# --- preemption ------------------------------------------------------------------------------
@pytest.mark.parametrize("method, stop_at, number", [("melo", 3, signal.SIGTERM), ("maml", 5, signal.SIGUSR1)])
def test_a_signalled_run_checkpoints_its_step_and_resumes_exactly(ratings_file, tmp_path, monkeypatch,
                                                                  method, stop_at, number):
    method_flags = ["--use_adaptive_loss=False"] if method == "maml" else []
    main.main(flags(ratings_file, tmp_path / "whole", *META, *method_flags))
    with monkeypatch.context() as patched:
        signal_at(patched, main.MetaTrainer, "train_step", stop_at, number)
        with pytest.raises(Preempted) as stopped:
            main.main(flags(ratings_file, tmp_path / "cut", *META, *method_flags))
    assert stopped.value.step == stop_at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the handlers are put back
    state = run_dir(tmp_path / "cut" / "log") / "state"
    preempted = load_checked(state / f"bert4rec_{stop_at}_ml-1m_{method}.pt", weights_only=False)
    assert preempted["preempted"] is True and preempted["iteration"] == stop_at
    main.main(flags(ratings_file, tmp_path / "cut", *META, *method_flags, f"--checkpoint_step={stop_at}"))
    whole, resumed = learner_of(tmp_path / "whole", 6, method), learner_of(tmp_path / "cut", 6, method)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_signalled_basic_finishes_its_epoch_and_resumes_exactly(ratings_file, tmp_path, monkeypatch):
    train_original.main(flags(ratings_file, tmp_path / "whole", "--pretrain_epochs=4", "--use_learned_loss_baseline=True"))
    with monkeypatch.context() as patched:
        signal_at(patched, train_original.BasicTrainer, "train_epoch", 2)
        with pytest.raises(Preempted) as stopped:
            train_original.main(flags(ratings_file, tmp_path / "cut", "--pretrain_epochs=4",
                                      "--use_learned_loss_baseline=True"))
    assert stopped.value.step == 2
    train_original.main(flags(ratings_file, tmp_path / "cut", "--pretrain_epochs=4",
                              "--use_learned_loss_baseline=True", "--checkpoint_step=2"))
    whole = sorted((run_dir(tmp_path / "whole" / "pre") / "state").glob("bert4rec_*_no_meta_best"))
    cut = sorted((run_dir(tmp_path / "cut" / "pre") / "state").glob("bert4rec_*_no_meta_best"))
    assert [path.name for path in whole] == [path.name for path in cut]
    for ours, theirs in zip(whole, cut):
        a, b = (load_checked(path, weights_only=False)["model"] for path in (ours, theirs))
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_command_line_says_how_to_resume_and_exits_75(ratings_file, tmp_path):
    command = [sys.executable, "-u", str(ROOT / "main.py"), *flags(ratings_file, tmp_path, "--num_train_iterations=400")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MELO_PROGRESS": "bars"})   # a line per iteration
    for line in process.stdout:
        if line.startswith("Iteration 3:"):
            process.send_signal(signal.SIGTERM)
            break
    output, errors = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_STATUS
    step = int(re.search(r"--checkpoint_step=(\d+)$", errors.strip()).group(1))
    assert step >= 3 and f"SIGTERM: the run stopped after iteration {step} and wrote" in errors and "Traceback" not in errors
    assert "resume it with: python main.py" in errors


# --- one writer per run folder --------------------------------------------------------------------
def test_a_second_run_of_a_folder_in_use_stops_at_once(ratings_file, tmp_path):
    args = parse_args(flags(ratings_file, tmp_path, *META))
    files = RunFiles(RunFilesConfig.from_args(args), "melo")
    files.make()
    with files.lock():
        with pytest.raises(UserError, match=rf"is in use by a MELO run of these settings \(pid {os.getpid()} on "):
            main.main(flags(ratings_file, tmp_path, *META))
        assert not files.steps(best=False)   # stopped before its first step
        main.main(flags(ratings_file, tmp_path, *META, "--use_adaptive_loss=False"))   # MAML beside it runs
    main.main(flags(ratings_file, tmp_path, *META))   # released
    assert files.steps(best=False) == [4, 6]


def test_temporary_files_of_a_killed_write_are_cleaned_up(ratings_file, tmp_path):
    args = parse_args(flags(ratings_file, tmp_path, *META))
    files = RunFiles(RunFilesConfig.from_args(args), "melo")
    files.make()
    leftover = files.state / ".bert4rec_4_ml-1m_melo.pt.abc123"
    others = files.state / ".bert4rec_4_ml-1m_maml.pt.def456"   # another method's write in flight
    leftover.write_bytes(b"")
    others.write_bytes(b"")
    test_json = files.state / ".bert4rec_4_best_ml-1m_melo_test.json.ghi789"   # a killed test's record
    test_json.write_bytes(b"")
    main.main(flags(ratings_file, tmp_path, *META))
    assert not leftover.exists() and not test_json.exists() and others.exists()


def test_temporary_pretrained_files_of_a_killed_basic_are_cleaned_up(ratings_file, tmp_path):
    argv = flags(ratings_file, tmp_path, "--pretrain_epochs=1", "--save_pretrained=True")
    files = RunFiles(RunFilesConfig.from_args(parse_args(argv)), "basic")
    leftovers = []
    for path in pretrained_paths(files.config).values():
        path.parent.mkdir(parents=True, exist_ok=True)
        leftovers.append(path.parent / f".{path.name}.xyz123")
        leftovers[-1].write_bytes(b"")
    other = pretrained_paths(files.config)["embedding"].parent / ".sasrec_embedding_ml-1m_64_2_2.xyz123"   # another model's
    other.write_bytes(b"")
    train_original.main(argv)
    assert not any(path.exists() for path in leftovers) and other.exists()


# --- a full disk ------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_leaves_nothing_partial_and_the_last_checkpoint_resumes(ratings_file, tmp_path,
                                                                                        monkeypatch):
    original, writes = Path.write_bytes, []

    def full_disk(self, data):
        writes.append(self.name)
        if len(writes) > 2:   # the checkpoints of step 4 (best and every) fit, step 6's do not
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UserError) as failed:
        main.main(flags(ratings_file, tmp_path, *META))
    message = str(failed.value)
    assert "\n" not in message and "No space left on device" in message and "MB free there" in message
    assert "the last good checkpoint is step 4" in message and "--checkpoint_step=4" in message
    state = run_dir(tmp_path / "log") / "state"
    assert not list(state.glob(".*.pt.*"))                             # nothing partial
    assert sorted(path.name for path in state.glob("*.pt")) == ["bert4rec_4_best_ml-1m_melo.pt",
                                                                "bert4rec_4_ml-1m_melo.pt"]
    monkeypatch.undo()
    main.main(flags(ratings_file, tmp_path, *META, "--checkpoint_step=4"))


# --- nothing damaged is used ------------------------------------------------------------------------
def test_a_checkpoint_with_flipped_bytes_is_refused(ratings_file, tmp_path):
    """Bytes flipped in a checkpoint's tensors leave a file that torch still reads (its zip
    records keep no checksum that it checks); the SHA-256 inside finds them."""
    main.main(flags(ratings_file, tmp_path, *META))
    path = run_dir(tmp_path / "log") / "state" / "bert4rec_6_ml-1m_melo.pt"
    wrapped = torch.load(path, weights_only=True)
    payload = bytearray(wrapped["payload"])
    weights = load_checked(path, weights_only=False)["learner"]["model.embedding.items.weight"]
    start = bytes(payload).find(weights.numpy().tobytes())             # inside the item embedding's record
    assert start > 0
    payload[start:start + 64] = bytes(255 - byte for byte in payload[start:start + 64])
    torch.load(io.BytesIO(bytes(payload)), weights_only=False)   # still readable as it is
    torch.save({**wrapped, "payload": bytes(payload)}, path)
    with pytest.raises(UserError, match="is damaged: its content does not match") as refused:
        main.main(flags(ratings_file, tmp_path, *META, "--test", "--test_best", "--checkpoint_step=6"))
    assert "the last good checkpoint is step 4" in str(refused.value)


@pytest.mark.parametrize("lost", ["format", "sha256", "identity"])
def test_a_checkpoint_that_lost_a_field_is_damaged_not_another_runs(ratings_file, tmp_path, lost):
    main.main(flags(ratings_file, tmp_path, *META))
    path = run_dir(tmp_path / "log") / "state" / "bert4rec_6_ml-1m_melo.pt"
    wrapped = torch.load(path, weights_only=True)
    if lost == "identity":
        state = load_checked(path, weights_only=False)
        del state["identity"]
        save_checked(state, path)
    else:
        del wrapped[lost]
        torch.save(wrapped, path)
    with pytest.raises(UserError, match=f"is damaged: .*{lost}.*the last good checkpoint is step 4") as refused:
        main.main(flags(ratings_file, tmp_path, *META, "--test", "--test_best", "--checkpoint_step=6"))
    assert "another run" not in str(refused.value) and "\n" not in str(refused.value)


def test_a_rating_file_edited_in_place_is_other_data(tmp_path):
    ratings = write_ratings(tmp_path / "data" / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=3)
    main.main(flags(ratings, tmp_path, *META))
    text = ratings.read_text()
    edited = text.replace("::5::", "::1::", 40)                       # 5 stars -> 1 star, the same size
    assert len(edited) == len(text) and edited != text
    ratings.write_text(edited)
    with pytest.raises(UserError, match=r"nothing to test: .*data_sha256 \w{12}… there, \w{12}… here"):
        main.main(flags(ratings, tmp_path, *META, "--test"))


@pytest.mark.parametrize("script", ["main", "train_original"])
def test_a_checkpoint_made_from_otherwise_ordered_data_is_refused(ratings_file, tmp_path, script):
    """The same file and flags sequence otherwise on another CPU (ratings that share a date,
    the default date sort): a checkpoint made there is neither tested nor resumed here."""
    if script == "main":
        run, extra, folder = main.main, META, "log"
        ways = [["--test", "--test_best", "--checkpoint_step=6"], ["--checkpoint_step=4"]]
    else:
        run, extra, folder = train_original.main, ["--pretrain_epochs=2"], "pre"
        ways = [["--test"], ["--checkpoint_step=1", "--pretrain_epochs=3"]]
    run(flags(ratings_file, tmp_path, *extra))
    state = run_dir(tmp_path / folder) / "state"
    checkpoints = sorted(state.glob("bert4rec_*.pt" if script == "main" else "bert4rec_*_no_meta_best"))
    assert len(checkpoints) >= 2
    for path in checkpoints:
        saved = load_checked(path, weights_only=False)
        assert saved["data_digest"] not in (None, "0" * 16)
        save_checked({**saved, "data_digest": "0" * 16}, path)
    for way in ways:
        with pytest.raises(UserError, match=r"checkpoint of (step|epoch) \d was made from other data than these "
                                            r"flags make of .* \(data digest 0{16}, here \w{16}\).*--stable_date_sort"):
            run(flags(ratings_file, tmp_path, *extra, *way))


def test_a_damaged_gzip_rating_file_is_one_line(tmp_path):
    import gzip
    ratings = write_ratings(tmp_path / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=3)
    packed = gzip.compress(ratings.read_bytes())
    damaged = tmp_path / "ratings.dat.gz"
    damaged.write_bytes(packed[:len(packed) // 2] + bytes(64) + packed[len(packed) // 2 + 64:])
    with pytest.raises(DataError, match="cannot parse it as movielens-dat: .*damaged, get it again"):
        main.main(flags(damaged, tmp_path, *META))


def test_a_pretrained_embedding_with_a_nan_is_refused(ratings_file, tmp_path):
    train_original.main(flags(ratings_file, tmp_path, "--pretrain_epochs=1", "--save_pretrained=True"))
    path = next((tmp_path / "pre").glob("*/embedding/*"))
    saved = load_checked(path, weights_only=True)
    name = next(iter(saved["state"]))
    saved["state"][name][3, 0] = float("nan")
    save_checked(saved, path)
    with pytest.raises(UserError, match=rf"holds non-finite values in {re.escape(name)}"):
        main.main(flags(ratings_file, tmp_path, *META, "--load_pretrained_embedding=True"))


def test_a_test_with_another_method_finds_no_checkpoint_and_says_why(ratings_file, tmp_path):
    main.main(flags(ratings_file, tmp_path, *META))
    with pytest.raises(UserError, match=r"nothing to test: .*other data or settings: .*normalize_weights False there, "
                                        r"True here"):
        main.main(flags(ratings_file, tmp_path, *META, "--test", "--normalize_weights=True"))


def test_a_basic_test_with_another_model_setting_is_refused(ratings_file, tmp_path):
    train_original.main(flags(ratings_file, tmp_path, "--pretrain_epochs=1"))
    with pytest.raises(UserError, match=r"other settings: --model_init_seed=5 \(now 6\); test it"):
        train_original.main(flags(ratings_file, tmp_path, "--test", "--model_init_seed=6"))


def test_a_batch_larger_than_the_training_users_is_refused(ratings_file, tmp_path):
    with pytest.raises(UserError, match=r"--batch_size=500 is more than the \d+ training users"):
        main.main(flags(ratings_file, tmp_path, *META, "--batch_size=500"))


def test_write_errors_name_the_file_and_leave_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_files.os, "replace", lambda *args: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(atomic_files.WriteError, match=r"cannot write .*record.json: Disk quota exceeded"):
        atomic_files.write_json(tmp_path / "record.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# --- a study that is stopped -------------------------------------------------------------------------
def test_sigterm_to_a_study_stops_its_run_and_leaves_no_process(ratings_file, tmp_path):
    study = [sys.executable, "-u", str(ROOT / "reproduce.py"), f"--data_path={ratings_file}", "--min_item=1",
             "--num_test_data=8", "--val_size=8", "--max_seq_len=8", "--pretrain_epochs=1",
             "--num_train_iterations=400", "--log_interval=2", "--models", "bert4rec", "--name=stopped",
             f"--results_dir={tmp_path}", "--", *TINY[4:]]
    process = subprocess.Popen(study, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if "MAML: training" in line:
            break
    log = tmp_path / "stopped" / "runs" / "222" / "bert4rec" / "maml.log"
    deadline = time.monotonic() + 60
    while "validation RMSE" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_STATUS
    alive = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path).encode()
             in Path(f"/proc/{pid}/cmdline").read_bytes()] if Path("/proc").is_dir() else []
    assert alive == []
    maml = reproduce.plan_runs(study_options.parse_command_line(study[3:]), tmp_path / "stopped" / "runs")[2]
    resumable = maml.last_checkpoint_step()
    assert resumable is not None and resumable >= 2


# --- runs that differ are separate runs -------------------------------------------------------------
def test_a_learning_rate_sweep_in_one_folder_is_three_runs_each_testable(ratings_file, tmp_path):
    rates = ("0.001", "0.01", "0.03")
    for rate in rates:
        main.main(flags(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2", f"--outer_lr={rate}"))
    assert len(list((tmp_path / "log").glob("*/state"))) == 3
    tested = {}
    for rate in rates:
        tested[rate] = main.main(flags(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2",
                                       f"--outer_lr={rate}", "--test", "--checkpoint_step=2"))
        record = next(path for path in (tmp_path / "log").glob("*/state/*_test.json")
                      if load_json(path)["identity"]["outer_lr"] == float(rate))
        assert load_json(record)["metrics"]["rmse"] == tested[rate]["rmse"]
    assert len({round(metrics["rmse"], 10) for metrics in tested.values()}) == 3


def load_json(path):
    return json.loads(Path(path).read_text())
