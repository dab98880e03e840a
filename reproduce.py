"""One command from a rating file to the paper's results table.

    python reproduce.py                                   # the quick study, on the bundled data
    python reproduce.py @studies/ml-100k-bert4rec.txt     # a study file: its flags, one or more a line
    python reproduce.py --mode=ml-1m --data_path=./Data/ml-1m/ratings.dat \\
        --models gru4rec narm sasrec bert4rec --seeds 222 223 \\
        --pretrain_epochs=20 --num_train_iterations=600 -- --first_order=True

With neither a study file nor --data_path it runs the quick study, studies/quick.txt: Basic,
MAML and MELO on the bundled MovieLens latest-small in a few minutes on two CPU cores. Flags
after a study file override it.

For each seed (the --random_seed of every run: the data split and the test users): the
mean-rating baseline (main.py --test_baseline), then for each model Basic
(train_original.py --save_pretrained=True, then --test on its latest best epoch), MAML and
MELO from Basic's embedding (main.py --load_pretrained_embedding=True, with
--use_adaptive_loss=False for MAML, then --test on the latest best checkpoint). Every run is
a subprocess; its output goes to results/<name>/runs/<seed>/<model>/<method>.log, its
checkpoints to the folder beside it. Flags after `--` go to every run.

Written under results/<name>/: results.json (every run: seed, model, method, metrics,
commands; the study file), table.md (the paper's layout), dataset.md (the data statistics)
and per_rating.png (RMSE per true rating). A finished run leaves <method>.json beside its log
and is not run again, so an interrupted study goes on where it stopped: an interrupted
MAML/MELO training resumes from its last checkpoint, an interrupted Basic training starts
over. With ``--from_results`` a runs folder with no finished run (a fresh clone, a lost disk)
gets the finished runs that results.json records, if it was written with the same flags
(without it a fresh clone runs the study again). ``--report_finished`` runs
nothing and reports the models and seeds whose runs have all finished: a study still under way.
"""

import codecs
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from config import DataConfig
from dataloader import load_data
from report import read_reference_results, write_reports
from run.atomic_files import LockHeld, exclusive_lock, write_json
from run.errors import DIVERGED_STATUS, UserError, run_cli
from run.preemption import Preempted
from run.progress import PROGRESS_VARIABLE, format_duration
from study.finished_runs import finished_record, finished_records, finished_so_far, learning_curve
from study.records import check_one_data_set, with_checksum
from study.results_json import read_results, read_waiting_runs, runs_own_records
from study.study_options import TITLES, TUNED_VARIANTS, check_run_flags, parse_command_line, study_flags
from study.study_plan import Estimate, as_typed, plan_runs, plan_summary, threads_per_run

LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1   # prctl(2): the signal a process gets when the thread that started it ends
PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RUNNING = set()        # the runs' processes now running, to pass signals on to
STOPPING = []          # the name of a signal the study received: no run starts after it
def check_same_study(runs_dir, flags, remember=True):
    """Finished runs made with other flags must not be reused: remember the flags of the
    study (unless ``remember`` is false: a report writes no runs), and refuse others once a
    run has finished."""
    path = runs_dir / "flags.json"
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier is not None and sorted(earlier) == sorted(flags):
        return
    if earlier is not None and finished_records(runs_dir):
        differences = " ".join(sorted(set(earlier) ^ set(flags))) or "the order of the flags"
        raise UserError(f"{runs_dir} holds runs made with other flags (they differ in: "
                        f"{differences}); give another --name, or delete {runs_dir} to start over")
    if remember:
        write_json(path, flags)


def restore_finished_runs(study, study_dir, runs):
    """A study whose runs folder holds no finished run (a fresh clone, a lost scratch disk)
    starts from the runs that its results.json records, when that was written with the same
    flags: their records are written back, so they are not run again."""
    path = study_dir / "results.json"
    if finished_records(study_dir / "runs") or not path.is_file():
        return
    recorded_study, records, _ = read_results(path)
    if sorted(study_flags(recorded_study)) != sorted(study_flags(study)):
        return
    records = [*runs_own_records(records), *read_waiting_runs(path)]
    by_run = {(record["seed"], record["model"], record["method"]): record for record in records}
    restored = [run for run in runs if (run.seed, run.model, run.method) in by_run]
    for run in restored:
        run.folder.mkdir(parents=True, exist_ok=True)
        write_json(run.record_path, with_checksum(by_run[run.seed, run.model, run.method]))
    if restored:
        announce(f"{len(restored)} finished runs restored from {path} (the runs folder held none)")


def execute(run, number, total, estimate=None):
    """Train (unless that is done) and test one run; return its record. A run with a
    record from an earlier invocation is not run again. Prints a line when a run starts, with
    the time the study still needs (``estimate``, a study_plan.Estimate), and one when it ends;
    the estimate learns how long the run took."""
    stop_if_signalled()   # a study that was stopped starts no run, and says of none that it starts
    tag = f"[{number}/{total}] {run.label}"
    if run.record_path.is_file():
        record = finished_record(run)
        announce(f"{tag}: done before: {record_summary(record)}")
        return record
    run.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    from_scratch = run.last_checkpoint_step() is None
    note = f"; the study: {estimate.left()}" if estimate else ""
    diverged = False
    tested = {"metrics": None}   # a run that diverged before its first validation has no checkpoint to test
    try:
        if run.train_command is not None:
            diverged = train(run, tag, note)
        else:
            announce(f"{tag}: testing{note}")
        if not diverged or run.files.steps(best=True):   # a diverged run: its best checkpoint
            invoke(run.test_command, run, "test")
            tested = read_test_results(run)
    except UserError:
        announce(f"{tag}: FAILED")
        raise
    record = {"seed": run.seed, "model": run.model, "method": run.method, "metrics": tested["metrics"],
              "checkpoint_step": tested.get("checkpoint_step"),   # Basic's epoch, MAML's / MELO's iteration
              "encoder_weight_per_rating": tested.get("encoder_weight_per_rating"),   # MELO's LSTM encoder
              "validation_rmse": tested.get("validation_rmse"),   # MAML's / MELO's best checkpoint's
              "data_digest": tested.get("data_digest"),           # which data (dataloader.sequences_digest)
              "diverged": diverged,
              "curve": learning_curve(run),
              "commands": [as_typed(command) for command in (run.train_command, run.test_command)
                           if command is not None],
              "log": str(run.log_path)}
    write_json(run.record_path, with_checksum(record))
    seconds = time.monotonic() - started
    if estimate and from_scratch:
        estimate.ran(run, seconds)
    announce(f"{tag}: {record_summary(record)} ({format_duration(seconds)})")
    return record


def record_summary(record):
    if record["metrics"] is None:
        return "diverged before its first validation: nothing to test"
    later = " (diverged later; its best checkpoint)" if record.get("diverged") else ""
    return metrics_summary(record["metrics"]) + later


def tuned_records(study, records):
    """Each tuned variant's record per seed and model of ``records``: a copy of the record of its
    run with the best validation RMSE, naming that run and every run's validation RMSE."""
    chosen = []
    model_seeds = dict.fromkeys((record["seed"], record["model"]) for record in records if record["model"] is not None)
    for method in (method for method in study.methods if method in TUNED_VARIANTS):
        for seed, model in model_seeds:
            runs = [record for record in records if (record["seed"], record["model"]) == (seed, model)
                    and record["method"] in TUNED_VARIANTS[method][1]]
            candidates = [record for record in runs if record["metrics"] is not None]
            for record in candidates:
                if record.get("validation_rmse") is None:
                    raise UserError(f"{Path(record['log']).with_suffix('.json')} has no validation RMSE "
                                    f"(recorded before {TITLES[method]} chose by it): delete it and run the "
                                    "study again; its test is run again from its checkpoint")
            best = min(candidates, key=lambda record: record["validation_rmse"])
            chosen.append({**best, "method": method, "chosen_run": best["method"],
                           "validation_rmse_of_runs": {record["method"]: record["validation_rmse"]
                                                       for record in runs}})
    return chosen


def train(run, tag, note=""):
    """Train from scratch, resume a run from its last resumable checkpoint (MAML's and MELO's
    every validation, a run stopped by a signal), or skip the training when that checkpoint is
    the last step's. Returns whether it diverged, which only a run that may is allowed."""
    resume_step = run.last_checkpoint_step()
    if resume_step is not None and resume_step >= run.final_step:
        announce(f"{tag}: testing{note}")
        return False
    if resume_step is None:
        remove_leftovers(run)
        announce(f"{tag}: training{note}")
        command = run.train_command
    else:
        announce(f"{tag}: training (resumed from step {resume_step}){note}")
        command = [*run.train_command, f"--checkpoint_step={resume_step}"]
    try:
        invoke(command, run, "training")
    except RunDiverged:
        if not run.may_diverge:
            raise
        return True
    return False


def remove_leftovers(run):
    """Delete what a killed run that left no resumable checkpoint wrote, holding the run's own
    lock: a run still running there (one that outlived an earlier study) is reported, never
    deleted under it."""
    files = run.files
    if not files.folder.is_dir():
        return
    try:
        with exclusive_lock(files.lock_path):
            shutil.rmtree(files.folder)
    except LockHeld as holder:
        raise UserError(f"{run.label}: {files.folder} is in use by a run ({holder}), perhaps one that an "
                        "earlier study left running; stop it (kill that pid), then run the study again") from None


def announce(line):
    """One line of the study's progress, in one write: with --jobs the runs' threads share
    the screen, and print() writes a line's end separately, so that another run's line
    could land between the two."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def invoke(command, run, phase):
    """Run one script with its output appended to the run's log, in plain lines (run/progress.py:
    no bars, a line per validation); run alone (no --jobs), its lines are shown too. It runs in
    a session of its own, so that only the signals the study passes on reach it
    (forward_signal). A failure is a UserError that shows the end of the log."""
    stop_if_signalled()
    with open(run.log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        shown = run.threads is None
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if shown else log,
                              stderr=subprocess.STDOUT, env=run_environment(run), start_new_session=True,
                              preexec_fn=stop_with_the_study) as process:
            RUNNING.add(process)
            try:
                if shown:
                    copy_stream(process.stdout, log, sys.stdout)
            finally:
                process.wait()
                RUNNING.discard(process)
    status = process.returncode
    stop_if_signalled()
    if status != 0:
        how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
        error = RunDiverged if status == DIVERGED_STATUS else UserError
        raise error(f"{run.label} {phase} failed ({how}). The end of {run.log_path}:\n{log_tail(run.log_path)}\n"
                    f"Finished runs are kept: fix the problem and run the same command again.")


def stop_with_the_study():
    """In a run's process before it starts (Linux): SIGUSR1 when the study's thread that started
    it ends, however the study ends — even killed with SIGKILL — so that the run checkpoints
    and stops rather than outliving its study. (The kernel sends it again as the child passes
    to each of the dying study's other threads: SIGUSR1, unlike a second SIGTERM, only asks the
    run to stop.)"""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGUSR1)


class RunDiverged(UserError):
    """A training stopped by a non-finite loss or validation (main.py's DIVERGED_STATUS)."""


def forward_signal(number, frame):
    """Pass a signal the study received on to its running runs, which stop (MAML, MELO and
    Basic after writing a resumable checkpoint); the study then stops too."""
    STOPPING.append(signal.Signals(number).name)
    for process in list(RUNNING):
        process.send_signal(number)


def stop_if_signalled():
    if not STOPPING:
        return
    if STOPPING[0] == "SIGINT":
        raise KeyboardInterrupt
    raise Preempted(f"{STOPPING[0]}: the study stopped; its finished runs are kept and the runs it "
                    "stopped resume from their checkpoints", step=None)


def copy_stream(source, *targets):
    """Copy a child's byte stream to text files as it comes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: source.read1(1 << 16), b""):
        text = decoder.decode(chunk)
        for target in targets:
            target.write(text)
            target.flush()


def run_environment(run):
    """The scripts' environment: unbuffered output in plain lines, and with --jobs the run's
    thread count."""
    threads = {} if run.threads is None else {"OMP_NUM_THREADS": str(run.threads)}
    return {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_VARIABLE: "lines", **threads}


def execution_order(run):
    """When a run starts: the baselines and Basic first (MAML and MELO start from Basic's
    embedding), then every seed's MAML and MELO, then the variants — a study stopped early
    has whole MAML and MELO pairs for as many seeds as it could."""
    return 0 if run.method in ("mean_rating", "basic") else 1 if run.method in ("maml", "melo") else 2


def execute_all(runs, jobs, estimate=None):
    """Every run's record, in the order of ``runs``, the runs started in ``execution_order``:
    one after the other, or with ``jobs`` > 1 that many at once, each with its share of the
    cores."""
    numbered = sorted(enumerate(runs, start=1), key=lambda pair: execution_order(pair[1]))
    if jobs == 1:
        records = {number: execute(run, number, len(runs), estimate) for number, run in numbered}
        return [records[number] for number in sorted(records)]
    numbered = [(number, replace(run, threads=threads_per_run(jobs))) for number, run in numbered]
    records = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for wave in ([pair for pair in numbered if execution_order(pair[1]) == 0],
                     [pair for pair in numbered if execution_order(pair[1]) > 0]):
            for (number, _), record in zip(wave, pool.map(lambda pair: execute(pair[1], pair[0], len(runs), estimate), wave)):
                records[number] = record
    return [records[number] for number in sorted(records)]


def execute_forwarding_signals(runs, jobs, estimate):
    """``execute_all``, with the signals that stop a study passed on to the runs (a preempted
    study stops its runs where they can resume)."""
    previous = {number: signal.signal(number, forward_signal) for number in FORWARDED_SIGNALS}
    try:
        return execute_all(runs, jobs, estimate)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        STOPPING.clear()


def log_tail(path, lines=LOG_TAIL_LINES):
    """The last lines of a log as a terminal shows them (progress bars redraw after '\\r')."""
    text = path.read_text(errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    shown = [line for line in shown if line.strip()]
    return "\n".join(f"  | {line}" for line in shown[-lines:])


def read_test_results(run):
    """The JSON that the run's test wrote: of the latest best checkpoint, which it tests."""
    files = run.files
    steps = files.steps(best=True)
    path = files.results(steps[-1] if steps else None)
    if not path.is_file():
        raise UserError(f"{run.label}: its test wrote no {path.name} in {path.parent}; see {run.log_path}")
    return json.loads(path.read_text())


def metrics_summary(metrics):
    return f"RMSE {metrics['rmse']:.4f} | MAE {metrics['mae']:.4f}"


def main(argv=None):
    study = parse_command_line(argv)
    first_seed_args = check_run_flags(study)
    study_dir = Path(study.results_dir) / study.name
    runs_dir = study_dir / "runs"
    # read once here: a bad file or setting stops the study before any run starts
    data = load_data(DataConfig.from_args(first_seed_args))
    stats = data.stats
    if study.report_finished:   # runs nothing, writes no run: the study may be running
        check_same_study(runs_dir, study_flags(study), remember=False)
        records, waiting = finished_so_far(plan_runs(study, runs_dir))
        check_one_data_set([*records, *waiting], None, runs_dir)
    else:
        with study_lock(runs_dir, study.name):
            records, waiting = run_study(study, study_dir, runs_dir, data), []
    records += tuned_records(study, records)
    reference_records = (read_reference_results(study.reference_results, study, records)
                         if study.reference_results and records else [])
    print(f"\n{write_reports(study, study_dir, stats, records, reference_records, waiting)}")
    print(f"Results: {study_dir / 'table.md'}, {study_dir / 'dataset.md'}, the figures ({study_dir / '*.png'}), "
          f"{study_dir / 'results.json'}")
    return records


@contextlib.contextmanager
def study_lock(runs_dir, name):
    """One invocation of a study at a time: its runs folder's lock, taken before anything there
    is written or deleted (the OS lets go of it when the study dies)."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make {runs_dir}: {error.strerror}; give a --results_dir that can be written") from None
    try:
        with exclusive_lock(runs_dir / ".study.lock"):
            yield
    except LockHeld as holder:
        raise UserError(f"the study {name} is running already ({holder}); wait for it to end, or see what it "
                        "has finished with --report_finished") from None


def run_study(study, study_dir, runs_dir, data):
    """Every run's record, running those that have none (the study's lock held); the finished
    ones must come from the data that this machine makes."""
    check_same_study(runs_dir, study_flags(study))
    runs = plan_runs(study, runs_dir)
    if study.from_results:
        restore_finished_runs(study, study_dir, runs)
    check_one_data_set([finished_record(run) for run in runs if run.record_path.is_file()], data.digest, runs_dir)
    print(plan_summary(study, runs, data.stats, runs_dir), flush=True)
    return execute_forwarding_signals(runs, study.jobs, Estimate(study, data.stats["num_train_users"], runs))


if __name__ == "__main__":
    run_cli(main)
