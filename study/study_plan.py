"""A study's runs, in order, and how long they should take: the commands of every run
(plan_runs), the plan printed at the start, and the estimate of the time left, which learns
this machine's speed from the runs that have finished."""
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import options
from config import RunFilesConfig
from run.run_files import RunFiles
from study.study_options import PROJECT_DIR, RUN_VARIANTS, TITLES, data_flags

# main.py's flags for each meta-learning method
META_FLAGS = {"maml": ["--use_adaptive_loss=False"], "melo": [],
              **{name: flags for name, (_, _, flags) in RUN_VARIANTS.items()}}
SCRIPT_METHOD = {"basic": "basic", "maml": "maml", "melo": "melo", "mean_rating": "mean_rating",
                 **{name: method for name, (_, method, _) in RUN_VARIANTS.items()}}   # main.py's name of each
# What a run costs on two CPU cores, for the estimate (Estimate rescales it to the machine as
# runs finish): seconds per MAML/MELO outer iteration of 16 tasks (the cost grows with the
# tasks), per validation or test user, per Basic epoch and training user, and per run (start-up,
# data, test); from the quick study's runs (docs/performance.md).
SECONDS_PER_ITERATION = {"gru4rec": 0.8, "narm": 0.4, "sasrec": 1.1, "bert4rec": 0.9, "ncf": 0.4}
SECONDS_PER_EVALUATED_USER = 0.006
SECONDS_PER_BASIC_USER_EPOCH = 0.0006
SECONDS_PER_RUN = 7
# A run on one thread beside another (--jobs 2 on two cores) takes 1.1-1.9x its two-thread time
# (benchmarks/meta_iteration.py, MELO of every model, 2026-12-04; the Amazon HIN study's runs).
ONE_THREAD_SLOWDOWN = 1.5


@dataclass
class Run:
    """One method of one model and seed: an optional training command, then its test."""
    seed: int
    model: str | None                # None for the mean-rating baseline
    method: str                      # basic, maml, melo, a variant's run or mean_rating
    folder: Path                     # holds <method>.log, <method>.json and <method>/
    train_command: list[str] | None
    test_command: list[str]
    final_step: int = 0              # Basic's last epoch, MAML's / MELO's last outer iteration
    threads: int | None = None       # with --jobs: the run's OMP_NUM_THREADS
    may_diverge: bool = False        # a run only to be chosen among: diverging is one of its outcomes

    @property
    def label(self):
        if self.model is None:
            return f"seed {self.seed} {TITLES[self.method]}"
        return f"seed {self.seed} {self.model} {TITLES[self.method]}"

    @property
    def files(self):
        """The script's own files for this run (run_files.RunFiles) under the --log_dir /
        --pretrain_log_dir given to it; MELO's variants are main.py's "melo"."""
        return RunFiles(RunFilesConfig.from_args(options.parse_args(script_flags(self.test_command))),
                        SCRIPT_METHOD[self.method])

    def last_checkpoint_step(self):
        """The step of the run's last resumable checkpoint, None when there is none to resume from."""
        if self.method == "mean_rating":
            return None
        steps = self.files.steps(best=False)
        return steps[-1] if steps else None

    def share_left(self):
        """The share of the run's training still to do: all of it but what its last checkpoint holds."""
        step = self.last_checkpoint_step()
        return 1.0 if step is None or not self.final_step else max(0.0, 1 - step / self.final_step)

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
        runs.append(Run(seed, None, "mean_rating", seed_dir, None, baseline))
        for model in study.models:
            folder = seed_dir / model
            model_flags = [*shared, f"--model={model}", f"--pretrain_log_dir={folder / 'basic'}"]
            basic = script("train_original.py", *model_flags,
                           f"--pretrain_epochs={study.pretrain_epochs}", *study.run_flags,
                           "--save_pretrained=True", processes=study.nproc_per_node)
            runs.append(Run(seed, model, "basic", folder, basic, [*basic, "--test"], final_step=study.pretrain_epochs))
            for method in study.run_methods[1:]:
                meta = script("main.py", *model_flags, f"--log_dir={folder / method}",
                              f"--num_train_iterations={study.num_train_iterations}",
                              f"--log_interval={study.log_interval}", *study.run_flags,
                              "--load_pretrained_embedding=True", *META_FLAGS[method],
                              processes=study.nproc_per_node)
                runs.append(Run(seed, model, method, folder, meta, [*meta, "--test"],
                                final_step=study.num_train_iterations,
                                may_diverge=method not in study.methods))
    return runs


def plan_summary(study, runs, stats, runs_dir):
    """What the study will run, and about how long that takes."""
    source = f"{', '.join(study.study_files)}: " if study.study_files else ""
    to_run = [run for run in runs if not run.record_path.is_file()]
    minutes = Estimate(study, stats["num_train_users"]).minutes(to_run)
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
    tasks = options.parse_args(study.run_flags).batch_size / options.FLAG["batch_size"].default   # of the default's
    return (SECONDS_PER_RUN + study.num_train_iterations * SECONDS_PER_ITERATION[run.model] * tasks
            + (validations * study.val_size + study.num_test_data) * SECONDS_PER_EVALUATED_USER)


def threads_per_run(jobs):
    """The cores shared out between ``jobs`` runs at once (--jobs): each run's thread count."""
    return max(1, (os.cpu_count() or 1) // jobs)


class Estimate:
    """The minutes that a study's runs still need: the cost model's seconds (expected_seconds),
    times how long this invocation's finished runs took against it — Basic's and the
    baseline's factor for them; for MAML and MELO the factor of the model's own finished runs,
    else of all finished MAML and MELO runs, else 1 — so that a slow machine is known after the
    first run of each kind, not at the end."""

    def __init__(self, study, num_train_users, runs=()):
        self.study, self.num_train_users, self.runs = study, num_train_users, runs
        self.measured = {}              # kind -> [seconds taken, seconds expected]
        self.lock = threading.Lock()    # with --jobs, runs end in threads of their own

    @staticmethod
    def kinds(run):
        """The factors that may scale ``run``, the closest first."""
        return [("meta", run.model), ("meta", None)] if run.method in META_FLAGS else [("basic", None)]

    def expected(self, run):
        slowdown = ONE_THREAD_SLOWDOWN if self.study.jobs > 1 and threads_per_run(self.study.jobs) == 1 else 1
        return expected_seconds(run, self.study, self.num_train_users) * slowdown

    def ran(self, run, seconds):
        """A run of this invocation took ``seconds``, having started from scratch."""
        with self.lock:
            for kind in self.kinds(run):
                measured = self.measured.setdefault(kind, [0.0, 0.0])
                measured[0] += seconds
                measured[1] += self.expected(run)

    def factor(self, run):
        with self.lock:
            for kind in self.kinds(run):
                if kind in self.measured:
                    taken, expected = self.measured[kind]
                    return taken / expected
        return 1.0

    def minutes(self, runs):
        """The minutes that ``runs`` should take, with --jobs sharing the cores; a run resumed from
        a checkpoint needs only the share of its training that is left."""
        return sum(self.expected(run) * self.factor(run) * run.share_left() for run in runs) / self.study.jobs / 60

    def left(self):
        """'about N min left': the study's runs that have no record yet (one starting among them)."""
        minutes = self.minutes([run for run in self.runs if not run.record_path.is_file()])
        return f"about {max(1, round(minutes))} min left"
