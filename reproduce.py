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
over.
"""
import argparse
import codecs
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

import options  # noqa: E402
from atomic_files import write_json  # noqa: E402
from config import DataConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from evaluation import paired_rmse_difference  # noqa: E402
from experiment import (UserError, checkpoint_pattern, checkpoint_steps, mean_rating_results_name,  # noqa: E402
                        run_cli, run_folder, test_results_name)

PROJECT_DIR = Path(__file__).resolve().parent
QUICK_STUDY = "studies/quick.txt"   # what runs with neither a study file nor --data_path
PAPER_MODELS = ("gru4rec", "narm", "sasrec", "bert4rec")
METHODS = ("basic", "maml", "melo")           # the paper's table
NORMALIZED_MELO = "melo_normalized"             # MELO with --normalize_weights=True
# main.py's flags for each meta-learning method
META_FLAGS = {"maml": ["--use_adaptive_loss=False"], "melo": [],
              NORMALIZED_MELO: ["--normalize_weights=True"]}
METRICS = ("rmse", "mae")
TITLES = {"basic": "Basic", "maml": "MAML", "melo": "MELO", NORMALIZED_MELO: "MELO (normalised)", "mean_rating": "mean rating",
          "gru4rec": "GRU4Rec", "narm": "NARM", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
          "ncf": "NCF", "rmse": "RMSE", "mae": "MAE"}
DATA_FLAGS = ("min_item", "min_sequence", "num_test_data", "val_size", "max_seq_len")
BUDGET_FLAGS = ("pretrain_epochs", "num_train_iterations", "log_interval")
# set by reproduce.py for each run, so not accepted after `--`
RESERVED_FLAGS = frozenset({
    "mode", "data_path", *DATA_FLAGS, *BUDGET_FLAGS, "model", "random_seed", "log_dir",
    "pretrain_log_dir", "test", "test_best", "test_baseline", "checkpoint_step",
    "save_pretrained", "load_pretrained", "load_pretrained_embedding", "use_adaptive_loss"})
REFERENCE_METHODS = ("maml", "melo")   # what benchmarks/reference_study.py writes
FLAG_HELP = {"min_item": "drop items with fewer ratings",
             "min_sequence": "drop users with fewer ratings", "num_test_data": "test users",
             "val_size": "validation users", "max_seq_len": "longest task window",
             "pretrain_epochs": "Basic's training epochs",
             "num_train_iterations": "MAML's and MELO's outer iterations",
             "log_interval": "MAML/MELO validate and checkpoint every N iterations"}
LOG_TAIL_LINES = 20
# What a run costs on two CPU cores at the default task sizes (docs/performance.md; the
# quick study's runs), for the estimate printed at the start: seconds per MAML/MELO outer
# iteration, per validation or test user, per Basic epoch and training user, and per run
# (start-up, data, test).
SECONDS_PER_ITERATION = {"gru4rec": 0.6, "narm": 0.4, "sasrec": 1.1, "bert4rec": 1.0, "ncf": 0.4}
SECONDS_PER_EVALUATED_USER = 0.006
SECONDS_PER_BASIC_USER_EPOCH = 0.0006
SECONDS_PER_RUN = 6


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def build_parser():
    run_defaults = options.build_parser()
    parser = argparse.ArgumentParser(
        usage="%(prog)s [@STUDY] [options] [-- flags for every run]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run Basic, MAML and MELO for each model and seed, and the mean-rating "
        "baseline, then write the results table, the data statistics and a per-rating "
        "figure under RESULTS_DIR/NAME/. Finished runs are reused. @STUDY reads flags from a "
        f"file (studies/*.txt; later flags override it); with neither a study file nor "
        f"--data_path, {QUICK_STUDY} runs: the quick study on the bundled MovieLens latest-small.",
        epilog="Flags after `--` are passed to every run, e.g. `-- --first_order=True "
        "--device=cuda` (see `python main.py --help`). table.md also gives MELO − MAML and "
        "MELO − Basic in test RMSE with a 95 % paired-bootstrap interval over the test users "
        "(per seed and pooled): an interval that excludes 0 is a difference that the choice of "
        "test users does not explain.")
    add = parser.add_argument
    add("--mode", default=run_defaults.get_default("mode"), choices=options.MODES,
        help="dataset reader")
    add("--data_path", default=None,
        help=f"rating file; None: the quick study's when no @STUDY is given, else "
        f"{run_defaults.get_default('data_path')}")
    for flag in DATA_FLAGS + BUDGET_FLAGS:
        add(f"--{flag}", type=int, default=run_defaults.get_default(flag),
            help=FLAG_HELP[flag])
    add("--models", nargs="+", choices=options.MODELS, default=list(PAPER_MODELS), metavar="MODEL",
        help=f"recommenders, one table row each: {', '.join(options.MODELS)}")
    add("--seeds", nargs="+", type=int, default=[run_defaults.get_default("random_seed")],
        metavar="SEED", help="--random_seed of the runs (data split, test users); several "
        "give mean ± std")
    add("--normalized_melo", action="store_true",
        help="also run MELO with --normalize_weights=True (each task's loss weights scaled to "
        "mean 1), as its own columns and paired differences")
    add("--reference_results", default=None, metavar="DIR",
        help="per-user test errors of the reference code's MAML and MELO on the same users, as "
        "benchmarks/reference_study.py writes them: table.md sets its MELO − MAML beside ours")
    add("--jobs", type=int, default=1, metavar="N",
        help="runs at once, each with its share of the cores (OMP_NUM_THREADS); Basic and the "
        "baselines first, then MAML and MELO")
    add("--nproc_per_node", type=int, default=1, metavar="N",
        help="run Basic, MAML and MELO under torchrun with N processes each, e.g. one per GPU "
        "(default: %(default)s)")
    add("--name", default=None,
        help="dataset name in the results folder; None: the data file's folder and --mode")
    add("--results_dir", default="results", help="where NAME/ goes")
    return parser


def parse_command_line(argv=None):
    """reproduce.py's own flags, with study files read in; ``run_flags`` holds those after
    `--`, for every run, and ``study_files`` the study files read."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, run_flags, study_files = read_study_files(argv[:split])
    study = build_parser().parse_args(own)
    if not study_files and study.data_path is None:
        own, run_flags, study_files = read_study_files([f"@{PROJECT_DIR / QUICK_STUDY}", *own])
        study = build_parser().parse_args(own)
        study_files = [QUICK_STUDY]
    study.data_path = study.data_path or options.build_parser().get_default("data_path")
    study.study_files = study_files
    study.models = list(dict.fromkeys(study.models))
    study.seeds = list(dict.fromkeys(study.seeds))
    for flag in ("jobs", "nproc_per_node"):
        if getattr(study, flag) < 1:
            raise UserError(f"--{flag}={getattr(study, flag)}: give at least 1")
    study.run_flags = [*run_flags, *argv[split + 1:]]
    study.methods = [*METHODS, *([NORMALIZED_MELO] if study.normalized_melo else [])]
    study.command = shlex.join(["python", "reproduce.py", *argv])
    study.name = study.name or default_name(study.data_path, study.mode)
    return study


def read_study_files(argv):
    """``argv`` with each ``@FILE`` replaced by the flags in FILE (shell words, one or more a
    line, ``#`` comments; a `--` in it starts flags for every run); returns the flags, the
    files' run flags and the files as given."""
    flags, run_flags, files = [], [], []
    for word in argv:
        if not word.startswith("@"):
            flags.append(word)
            continue
        path = Path(word[1:])
        try:
            words = shlex.split(path.read_text(), comments=True)
        except OSError as error:
            raise UserError(f"cannot read the study file {path}: {error.strerror}; the committed "
                            f"studies are in {PROJECT_DIR / 'studies'}") from None
        split = words.index("--") if "--" in words else len(words)
        flags += words[:split]
        run_flags += words[split + 1:]
        files.append(word[1:])
    return flags, run_flags, files


def default_name(data_path, mode):
    folder = Path(data_path).resolve().parent.name
    return folder if folder == mode else f"{folder}_{mode}"


def parse_run_flags(parse, argv):
    """``parse(argv)`` with a parser of the runs' flags; a bad flag is a UserError."""
    try:
        return parse(argv)
    except options.FlagError as error:
        raise UserError(f"flags for the runs: {error}") from None


def options_given(argv):
    """Names of the run options that ``argv`` sets (abbreviations resolved as argparse does):
    those whose value is not the default, an object that no flag can give."""
    parser = options.build_parser()
    unset = object()
    parser.set_defaults(**{name: unset for name in vars(parser.parse_args([]))})
    given = parse_run_flags(parser.parse_args, argv)
    return {name for name, value in vars(given).items() if value is not unset}


def check_run_flags(study):
    """Refuse flags after `--` that reproduce.py sets itself, or that the runs would refuse;
    return the first seed's run options (for the data statistics)."""
    reserved_here = RESERVED_FLAGS | ({"normalize_weights"} if study.normalized_melo else set())
    reserved = sorted(options_given(study.run_flags) & reserved_here)
    if reserved:
        names = ", ".join(f"--{name}" for name in reserved)
        raise UserError(f"{names} after `--`: reproduce.py sets these for each run; give the "
                        f"data and budget flags before `--` (see reproduce.py --help)")
    return parse_run_flags(options.parse_args,
                           [*data_flags(study), f"--random_seed={study.seeds[0]}", *study.run_flags])


def data_flags(study):
    return [f"--mode={study.mode}", f"--data_path={study.data_path}",
            *(f"--{flag}={getattr(study, flag)}" for flag in DATA_FLAGS)]


def study_flags(study):
    """Every flag that the runs of all seeds and models share."""
    return [*data_flags(study), *(f"--{flag}={getattr(study, flag)}" for flag in BUDGET_FLAGS),
            *study.run_flags]


def check_same_study(runs_dir, flags):
    """Finished runs made with other flags must not be reused: remember the flags of the
    study, and refuse others once a run has finished."""
    path = runs_dir / "flags.json"
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier == flags:
        return
    if earlier is not None and finished_records(runs_dir):
        differences = " ".join(sorted(set(earlier) ^ set(flags))) or "the order of the flags"
        raise UserError(f"{runs_dir} holds runs made with other flags (they differ in: "
                        f"{differences}); give another --name, or delete {runs_dir} to start over")
    write_json(path, flags)


def finished_records(runs_dir):
    return [path for method in (*METHODS, NORMALIZED_MELO, "mean_rating")
            for path in runs_dir.glob(f"**/{method}.json")]


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------
@dataclass
class Run:
    """One method of one model and seed: an optional training command, then its test."""
    seed: int
    model: str | None                # None for the mean-rating baseline
    method: str                      # basic, maml, melo, melo_normalized or mean_rating
    folder: Path                     # holds <method>.log, <method>.json and <method>/
    train_command: list[str] | None
    test_command: list[str]
    test_results: str                # the test's JSON file under work_dir, may hold {step}
    checkpoint_pattern: str | None = None   # MAML/MELO every-validation checkpoints
    final_step: int = 0
    threads: int | None = None       # with --jobs: the run's OMP_NUM_THREADS

    @property
    def label(self):
        if self.model is None:
            return f"seed {self.seed} {TITLES[self.method]}"
        return f"seed {self.seed} {self.model} {TITLES[self.method]}"

    @property
    def work_dir(self):
        """The folder of the run's own files: the script's run folder for these flags
        (experiment.run_folder) under the --log_dir / --pretrain_log_dir given to it."""
        return run_folder(options.parse_args(script_flags(self.test_command)), self.folder / self.method)

    @property
    def log_path(self):
        return self.folder / f"{self.method}.log"

    @property
    def record_path(self):
        return self.folder / f"{self.method}.json"


def script(name, *flags, processes=1):
    """The command that runs one of the project's scripts, under torchrun with ``processes`` > 1."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, str(PROJECT_DIR / name), *flags]


def script_position(command):
    """Where a ``script`` command names its script."""
    return next(i for i, part in enumerate(command) if part.endswith(".py"))


def script_flags(command):
    """The flags that a ``script`` command gives its script."""
    return command[script_position(command) + 1:]


def as_typed(command):
    """A command as a user types it in the repository: `python train_original.py …`, or
    `torchrun --standalone --nproc_per_node=2 main.py …`."""
    position = script_position(command)
    launcher = ["torchrun", *command[3:position]] if "torch.distributed.run" in command[:position] else ["python"]
    return shlex.join([*launcher, Path(command[position]).name, *command[position + 1:]])


def plan_runs(study, runs_dir):
    """Every run of the study, in order: per seed the baseline, then per model Basic, MAML, MELO."""
    runs = []
    for seed in study.seeds:
        seed_dir = runs_dir / str(seed)
        shared = [*data_flags(study), f"--random_seed={seed}"]
        baseline = script("main.py", *shared, f"--log_dir={seed_dir / 'mean_rating'}",
                          *study.run_flags, "--test_baseline")
        runs.append(Run(seed, None, "mean_rating", seed_dir, None, baseline,
                        mean_rating_results_name(study.mode)))
        for model in study.models:
            folder = seed_dir / model
            model_flags = [*shared, f"--model={model}", f"--pretrain_log_dir={folder / 'basic'}"]
            basic = script("train_original.py", *model_flags,
                           f"--pretrain_epochs={study.pretrain_epochs}", *study.run_flags,
                           "--save_pretrained=True", processes=study.nproc_per_node)
            runs.append(Run(seed, model, "basic", folder, basic, [*basic, "--test"],
                            f"state/{test_results_name(checkpoint_pattern(model, study.mode, 'basic'))}"))
            for method in study.methods[1:]:
                meta = script("main.py", *model_flags, f"--log_dir={folder / method}",
                              f"--num_train_iterations={study.num_train_iterations}",
                              f"--log_interval={study.log_interval}", *study.run_flags,
                              "--load_pretrained_embedding=True", *META_FLAGS[method],
                              processes=study.nproc_per_node)
                named = "maml" if method == "maml" else "melo"   # main.py's name of the method
                runs.append(Run(seed, model, method, folder, meta, [*meta, "--test"],
                                f"state/{test_results_name(checkpoint_pattern(model, study.mode, named))}",
                                checkpoint_pattern=checkpoint_pattern(model, study.mode, named, best=False),
                                final_step=study.num_train_iterations))
    return runs


def plan_summary(study, runs, stats, runs_dir):
    """What the study will run, and about how long that takes."""
    source = f"{', '.join(study.study_files)}: " if study.study_files else ""
    to_run = [run for run in runs if not run.record_path.is_file()]
    minutes = sum(expected_seconds(run, study, stats["num_train_users"]) for run in to_run) / 60 / study.jobs
    return (f"Study {study.name} ({source}{stats['path']}, {stats['num_users']:,} users, "
            f"{stats['num_ratings']:,} ratings; {study.num_test_data} test users)\n"
            f"  seeds {' '.join(map(str, study.seeds))}; models {' '.join(study.models)}; "
            f"{', '.join(TITLES[method] for method in study.methods)}; the mean-rating baseline\n"
            f"  Basic {study.pretrain_epochs} epochs, then MAML and MELO {study.num_train_iterations} "
            f"outer iterations from its embedding, validated every {study.log_interval}\n"
            f"  {len(runs)} runs ({len(runs) - len(to_run)} finished earlier); expected: about "
            f"{max(1, round(minutes))} min on two CPU cores ({os.cpu_count()} here)\n"
            f"  logs and checkpoints: {runs_dir}")


def expected_seconds(run, study, num_train_users):
    """A rough duration of one run on two CPU cores (the SECONDS_ constants)."""
    if run.method == "mean_rating":
        return SECONDS_PER_RUN
    if run.method == "basic":
        return SECONDS_PER_RUN + study.pretrain_epochs * (
            num_train_users * SECONDS_PER_BASIC_USER_EPOCH + study.val_size * SECONDS_PER_EVALUATED_USER)
    validations = study.num_train_iterations // study.log_interval
    return (SECONDS_PER_RUN + study.num_train_iterations * SECONDS_PER_ITERATION[run.model]
            + (validations * study.val_size + study.num_test_data) * SECONDS_PER_EVALUATED_USER)


def execute(run, number, total):
    """Train (unless that is done) and test one run; return its record. A run with a
    record from an earlier invocation is not run again. Prints a line when a run starts and
    one when it ends."""
    tag = f"[{number}/{total}] {run.label}"
    if run.record_path.is_file():
        record = json.loads(run.record_path.read_text())
        announce(f"{tag}: done before: {metrics_summary(record['metrics'])}")
        return record
    run.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        if run.train_command is not None:
            train(run, tag)
        else:
            announce(f"{tag}: testing")
        invoke(run.test_command, run, "test")
        tested = read_test_results(run)
    except UserError:
        announce(f"{tag}: FAILED")
        raise
    metrics = tested["metrics"]
    record = {"seed": run.seed, "model": run.model, "method": run.method, "metrics": metrics,
              "checkpoint_step": tested.get("checkpoint_step"),   # Basic's epoch, MAML's / MELO's iteration
              "encoder_weight_per_rating": tested.get("encoder_weight_per_rating"),   # MELO's LSTM encoder
              "commands": [as_typed(command) for command in (run.train_command, run.test_command)
                           if command is not None],
              "log": str(run.log_path)}
    write_json(run.record_path, record)
    announce(f"{tag}: {metrics_summary(metrics)} ({format_duration(time.monotonic() - started)})")
    return record


def train(run, tag):
    """Train from scratch, resume a MAML/MELO run from its last checkpoint, or skip the
    training when that checkpoint is the last step's."""
    resume_step = last_checkpoint_step(run)
    if resume_step is None:
        shutil.rmtree(run.work_dir, ignore_errors=True)   # an interrupted Basic run's leftovers
        announce(f"{tag}: training")
        invoke(run.train_command, run, "training")
    elif resume_step < run.final_step:
        announce(f"{tag}: training (resumed from step {resume_step})")
        invoke([*run.train_command, f"--checkpoint_step={resume_step}"], run, "training")
    else:
        announce(f"{tag}: testing")


def announce(line):
    """One line of the study's progress, in one write: with --jobs the runs' threads share
    the screen, and print() writes a line's end separately, so that another run's line
    could land between the two."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def last_checkpoint_step(run):
    """The step of a MAML/MELO run's last checkpoint, None when there is none to resume from."""
    if run.checkpoint_pattern is None:
        return None
    steps = checkpoint_steps(run.work_dir / "state", run.checkpoint_pattern)
    return steps[-1] if steps else None


def invoke(command, run, phase):
    """Run one script with its output appended to the run's log; run alone (no --jobs), its
    progress bars (its standard error) are shown too. A failure is a UserError that shows
    the end of the log."""
    with open(run.log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        shown = run.threads is None
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.PIPE if shown else subprocess.STDOUT,
                              env=run_environment(run)) as process:
            if shown:
                copy_stream(process.stderr, log, sys.stderr)
        status = process.returncode
    if status != 0:
        how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
        raise UserError(f"{run.label} {phase} failed ({how}). The end of {run.log_path}:\n"
                        f"{log_tail(run.log_path)}\n"
                        f"Finished runs are kept: fix the problem and run the same command again.")


def copy_stream(source, *targets):
    """Copy a child's byte stream to text files as it comes (progress bars redraw in place)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: source.read1(1 << 16), b""):
        text = decoder.decode(chunk)
        for target in targets:
            target.write(text)
            target.flush()


def run_environment(run):
    """The scripts' environment: unbuffered output, and with --jobs the run's thread count."""
    threads = {} if run.threads is None else {"OMP_NUM_THREADS": str(run.threads)}
    return {**os.environ, "PYTHONUNBUFFERED": "1", **threads}


def execute_all(runs, jobs):
    """Every run's record, in the order of ``runs``: one after the other, or with ``jobs`` > 1
    that many at once, each with its share of the cores — first the baselines and Basic,
    then MAML and MELO, which start from Basic's embedding."""
    if jobs == 1:
        return [execute(run, number, len(runs)) for number, run in enumerate(runs, start=1)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    numbered = [(number, replace(run, threads=threads)) for number, run in enumerate(runs, start=1)]
    records = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for wave in ([pair for pair in numbered if pair[1].method in ("mean_rating", "basic")],
                     [pair for pair in numbered if pair[1].method not in ("mean_rating", "basic")]):
            for (number, _), record in zip(wave, pool.map(lambda pair: execute(pair[1], pair[0], len(runs)), wave)):
                records[number] = record
    return [records[number] for number, _ in numbered]


def log_tail(path, lines=LOG_TAIL_LINES):
    """The last lines of a log as a terminal shows them (progress bars redraw after '\\r')."""
    text = path.read_text(errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    shown = [line for line in shown if line.strip()]
    return "\n".join(f"  | {line}" for line in shown[-lines:])


def read_test_results(run):
    """The JSON that the run's test wrote: the latest best checkpoint's when named by step."""
    path = run.work_dir / run.test_results
    if "{step}" in path.name:
        steps = checkpoint_steps(path.parent, path.name)
        if not steps:
            raise UserError(f"{run.label}: its test wrote no {path.name.format(step='N')} in "
                            f"{path.parent}; see {run.log_path}")
        path = path.parent / path.name.format(step=steps[-1])
    return json.loads(path.read_text())


def metrics_summary(metrics):
    return f"RMSE {metrics['rmse']:.4f} | MAE {metrics['mae']:.4f}"


def format_duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def metric_values(records, model, method, metric):
    """One value per seed."""
    return [r["metrics"][metric] for r in records if r["model"] == model and r["method"] == method]


def mean_cell(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def improvement(other, melo):
    """MELO's improvement over another method in %: positive when MELO's error is lower."""
    return (other - melo) / other * 100


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def model_row(records, model, methods):
    """A model's cells: each method's RMSE and MAE, then MELO's improvements on the means."""
    def mean(method, metric):
        return statistics.fmean(metric_values(records, model, method, metric))

    return [TITLES[model],
            *(mean_cell(metric_values(records, model, method, metric))
              for method in methods for metric in METRICS),
            *(f"{improvement(mean(other, metric), mean('melo', metric)):+.2f}"
              for other in ("basic", "maml") for metric in METRICS)]


def results_table(study, records):
    header = ["Model",
              *(f"{TITLES[method]} {TITLES[metric]}" for method in study.methods for metric in METRICS),
              *(f"MELO vs {TITLES[other]} {TITLES[metric]} (%)" for other in ("basic", "maml")
                for metric in METRICS)]
    rows = [model_row(records, model, study.methods) for model in study.models]
    baseline = [mean_cell(metric_values(records, None, "mean_rating", metric)) for metric in METRICS]
    rows.append(["Mean rating", *baseline, *[""] * (len(header) - 3)])
    test_users = metric_values(records, None, "mean_rating", "num_users")[0]
    spread = (f"mean ± sample standard deviation over seeds {', '.join(map(str, study.seeds))}"
              if len(study.seeds) > 1 else f"seed {study.seeds[0]}")
    extra = f"; flags given to every run: `{shlex.join(study.run_flags)}`" if study.run_flags else ""
    return (f"# Results: {study.name}\n\n"
            f"Test RMSE and MAE in stars on the same {test_users} cold-start test users for every "
            f"method ({spread}). Basic: {study.pretrain_epochs} epochs; MAML and MELO: "
            f"{study.num_train_iterations} iterations from Basic's embedding{extra}.\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"MELO vs X = (X − MELO) / X × 100 on the means over seeds: positive when MELO's "
            f"error is lower. Mean rating: the training users' mean rating predicted for every "
            f"test target (no model); its RMSE and MAE are in the Basic columns.\n")


def per_user_errors(records, model, method, seed):
    """A run's per-user test errors, None when it has none (recorded before they were kept)."""
    record = next((r for r in records if (r["model"], r["method"], r["seed"]) == (model, method, seed)), None)
    return None if record is None else record["metrics"].get("per_user")


def paired_rows(records, model, method, other, seeds):
    """``method``'s test RMSE minus ``other``'s on the same users, with its 95 % paired-bootstrap
    interval: per seed, and pooled over the seeds (their users together) when there are several."""
    rows, pooled, pooled_other = [], [], []
    for seed in seeds:
        errors, other_errors = (per_user_errors(records, model, m, seed) for m in (method, other))
        if errors is None or other_errors is None:
            continue
        if errors["user"] != other_errors["user"]:
            raise UserError(f"seed {seed} {model}: {TITLES[method]} and {TITLES[other]} were tested on "
                            "other users; run both again")
        rows.append({"model": model, "method": method, "versus": other, "seed": seed,
                     **paired_rmse_difference(errors["squared_error"], other_errors["squared_error"])})
        pooled += errors["squared_error"]
        pooled_other += other_errors["squared_error"]
    if len(rows) > 1:
        rows.append({"model": model, "method": method, "versus": other, "seed": "pooled",
                     **paired_rmse_difference(pooled, pooled_other)})
    return rows


def paired_differences(records, study):
    """Each MELO variant against MAML and against Basic, per model (see paired_rows)."""
    return [row for model in study.models for method in study.methods[2:] for other in ("maml", "basic")
            for row in paired_rows(records, model, method, other, study.seeds)]


def interval_cell(row):
    return f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


def paired_table(paired):
    if not paired:
        return ""
    columns = list(dict.fromkeys((row["method"], row["versus"]) for row in paired))
    header = ["Model", "Seed", *(f"{TITLES[method]} − {TITLES[other]} RMSE [95 % interval]"
                                 for method, other in columns)]
    cells = {}
    for row in paired:
        cells.setdefault((row["model"], row["seed"]), {})[row["method"], row["versus"]] = interval_cell(row)
    rows = [[TITLES[model], str(seed), *(found.get(column, "") for column in columns)]
            for (model, seed), found in cells.items()]
    return (f"\n## Paired differences\n\nMELO's test RMSE minus the other method's on the same test "
            f"users, with a 95 % interval from a paired bootstrap over the users "
            f"({paired[0]['resamples']:,} resamples, seeded): negative when MELO's error is lower; "
            f"an interval that excludes 0 is a difference that the choice of test users does not "
            f"explain. Pooled: the seeds' test users together.\n\n{markdown_table(header, rows)}\n")


# --------------------------------------------------------------------------------------
# The reference code's runs on the same users
# --------------------------------------------------------------------------------------
def read_reference_results(folder, study, records):
    """The reference's MAML and MELO records (benchmarks/reference_study.py's JSON files) for
    the study's models and seeds that have them, checked to be of this study's test users."""
    found = []
    for seed in study.seeds:
        for model in study.models:
            paths = [Path(folder) / f"{model}_{method}_seed{seed}.json" for method in REFERENCE_METHODS]
            if not all(path.is_file() for path in paths):
                continue
            ours = per_user_errors(records, model, "maml", seed)
            for path in paths:
                record = json.loads(path.read_text())
                if ours is not None and record["metrics"]["per_user"]["user"] != ours["user"]:
                    raise UserError(f"{path}: the reference was tested on other users than this study's "
                                    f"seed {seed} (run it with --seed {seed} on the same data file)")
                found.append(record)
    return found


def reference_table(study, records, reference_records, paired):
    """Per model and seed (and pooled): MAML's and MELO's test RMSE in both codebases and
    their MELO − MAML intervals side by side, and whether ours lies inside the reference's."""
    header = ["Model", "Seed", "Reference MAML", "Reference MELO", "Reference MELO − MAML [95 %]",
              "Ours MAML", "Ours MELO", "Ours MELO − MAML [95 %]", "Ours inside the reference's interval"]
    rows, summary = [], []
    for model in study.models:
        theirs = {row["seed"]: row for row in paired_rows(reference_records, model, "melo", "maml", study.seeds)}
        ours = {row["seed"]: row for row in paired
                if (row["model"], row["method"], row["versus"]) == (model, "melo", "maml")}
        for seed in theirs:
            rmse = {(codebase, method): (statistics.fmean(metric_values(source, model, method, "rmse"))
                                         if seed == "pooled" else
                                         metric_values([r for r in source if r["seed"] == seed], model, method,
                                                       "rmse")[0])
                    for codebase, source in (("reference", [r for r in reference_records if r["seed"] in theirs]),
                                             ("ours", [r for r in records if r["seed"] in theirs]))
                    for method in REFERENCE_METHODS}
            mine = ours.get(seed)
            inside = "" if mine is None else ("yes" if theirs[seed]["low"] <= mine["difference"] <= theirs[seed]["high"]
                                              else "no")
            rows.append([TITLES[model], str(seed), *(f"{rmse['reference', m]:.4f}" for m in REFERENCE_METHODS),
                         interval_cell(theirs[seed]), *(f"{rmse['ours', m]:.4f}" for m in REFERENCE_METHODS),
                         "" if mine is None else interval_cell(mine), inside])
            summary.append({"model": model, "seed": seed, "reference": theirs[seed], "ours": mine,
                            "inside": inside == "yes"})
    if not rows:
        return "", summary
    return (f"\n## Side by side with the reference code\n\nThe reference implementation's MAML and MELO "
            f"(benchmarks/reference_study.py: its own code, seeded, same data file and test users), "
            f"test RMSE and MELO − MAML with its 95 % paired-bootstrap interval, beside this project's. "
            f"Pooled RMSE: the mean over the seeds.\n\n{markdown_table(header, rows)}\n"), summary


def dataset_table(study, stats):
    header = ["Dataset", "#Users", "#Items", "#Ratings", "Avg. length", "Balance score"]
    row = [study.name, f"{stats['num_users']:,}", f"{stats['num_items']:,}",
           f"{stats['num_ratings']:,}", f"{stats['avg_seq_len']:.1f}", f"{stats['balance_score']:.3f}"]
    distribution = " | ".join(f"{rating:g}: {count:,} ({count / stats['num_ratings']:.1%})"
                              for rating, count in stats["rating_counts"].items())
    return (f"# Dataset: {study.name}\n\n"
            f"{markdown_table(header, [row])}\n\n"
            f"- file: `{stats['path']}` ({stats['layout']}, `--mode={study.mode}`)\n"
            f"- kept: items with at least {study.min_item} ratings, then users with at least "
            f"{study.min_sequence}\n"
            f"- average length: of the sequences cut at max_seq_len={stats['max_seq_len']} "
            f"({stats['avg_full_seq_len']:.1f} uncut)\n"
            f"- ratings: {distribution}\n"
            f"- balance score: normalised entropy of the rating histogram (1 = every rating "
            f"equally frequent)\n"
            f"- users per seed: {stats['num_train_users']:,} train, {stats['num_valid_users']:,} "
            f"valid, {stats['num_test_users']:,} test\n")


def per_rating_rmse(reports, rating):
    """Mean and standard deviation over seeds of the RMSE at one true rating (nan when absent)."""
    values = [report[rating]["rmse"] for report in reports
              if rating in report and report[rating]["rmse"] is not None]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_rating_panels(study, records):
    """Per model: its per-rating reports by method (one per seed), the true ratings that
    test targets have, in order, and their target counts summed over seeds."""
    panels = []
    for model in study.models:
        reports = {method: [r["metrics"]["per_rating"] for r in records
                            if r["model"] == model and r["method"] == method] for method in study.methods}
        counts = {}
        for report in reports["basic"]:
            for rating, entry in report.items():
                counts[rating] = counts.get(rating, 0) + entry["count"]
        ratings = sorted((rating for rating, count in counts.items() if count), key=float)
        panels.append((model, reports, ratings, counts))
    return panels


def plot_per_rating(study, records, path):
    """Grouped bars of the RMSE per true rating, Basic / MAML / MELO, one panel per model;
    the tick labels give the number of test targets with that rating (all seeds)."""
    panels = per_rating_panels(study, records)
    most_ratings = max(len(ratings) for _, _, ratings, _ in panels)
    panel_inches = max(4.8, 0.6 * most_ratings + 1.0)  # half stars need wider panels
    figure, axes = plt.subplots(1, len(panels), figsize=(max(6.0, panel_inches * len(panels)), 4.4),
                                squeeze=False, sharey=True, layout="constrained")
    width = 0.8 / len(study.methods)
    for axis, (model, reports, ratings, counts) in zip(axes[0], panels):
        positions = np.arange(len(ratings))
        for offset, method in enumerate(study.methods):
            means, stds = zip(*(per_rating_rmse(reports[method], rating) for rating in ratings))
            axis.bar(positions + (offset - (len(study.methods) - 1) / 2) * width, means, width,
                     label=TITLES[method],
                     yerr=stds if len(study.seeds) > 1 else None, capsize=2)
        axis.set_xticks(positions, [f"{rating}\nn={counts[rating]}" for rating in ratings])
        axis.set_title(TITLES[model])
        axis.set_xlabel("true rating")
    axes[0][0].set_ylabel("RMSE (stars)")
    axes[0][0].legend()
    seeds = (f"mean ± std over {len(study.seeds)} seeds" if len(study.seeds) > 1
             else f"seed {study.seeds[0]}")
    figure.suptitle(f"{study.name}: test RMSE per true rating\n({seeds})")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(study, study_dir, stats, records):
    paired = paired_differences(records, study)
    reference_records = (read_reference_results(study.reference_results, study, records)
                         if study.reference_results else [])
    side_by_side, reference_summary = reference_table(study, records, reference_records, paired)
    write_json(study_dir / "results.json",
               {"dataset": study.name, "command": study.command, "study": study.study_files,
                "data_path": study.data_path,
                "mode": study.mode, "seeds": study.seeds, "models": study.models,
                "methods": study.methods, "run_flags": study.run_flags, "runs": records, "paired": paired,
                "reference_runs": reference_records, "reference_paired": reference_summary})
    table = results_table(study, records) + paired_table(paired) + side_by_side
    (study_dir / "table.md").write_text(table)
    (study_dir / "dataset.md").write_text(dataset_table(study, stats))
    plot_per_rating(study, records, study_dir / "per_rating.png")
    return table


# --------------------------------------------------------------------------------------
def main(argv=None):
    study = parse_command_line(argv)
    first_seed_args = check_run_flags(study)
    study_dir = Path(study.results_dir) / study.name
    runs_dir = study_dir / "runs"
    # read once here: a bad file or setting stops the study before any run starts
    stats = load_data(DataConfig.from_args(first_seed_args)).stats
    check_same_study(runs_dir, study_flags(study))
    runs = plan_runs(study, runs_dir)
    print(plan_summary(study, runs, stats, runs_dir), flush=True)
    records = execute_all(runs, study.jobs)
    print(f"\n{write_outputs(study, study_dir, stats, records)}")
    print(f"Results: {study_dir / 'table.md'}, {study_dir / 'dataset.md'}, "
          f"{study_dir / 'per_rating.png'}, {study_dir / 'results.json'}")
    return records


if __name__ == "__main__":
    run_cli(main)
