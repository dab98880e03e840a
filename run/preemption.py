"""Runs that a cluster may stop. SIGTERM (what SLURM and most schedulers send at a time limit
or a preemption) and SIGUSR1 (which SLURM's ``--signal=USR1@SECONDS`` sends ahead of the
limit) let a training run finish the step it is in, write a resumable checkpoint of it and
stop with PREEMPTED_STATUS, printing the command that resumes it. A second SIGTERM acts as
usual; SIGUSR1 only ever asks to stop, since it may come more than once (reproduce.py's runs
get it when their study dies, once per thread of the dying study that they pass to). Under
torchrun every process stops at the same step."""
import os
import shlex
import signal
import sys
from pathlib import Path

from run import distributed

PREEMPTED_STATUS = 75       # EX_TEMPFAIL: stopped on request, resumable; requeue the job
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A run that stopped at a signal after writing the checkpoint of ``step``."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class StopRequests:
    """While inside: SIGTERM (the first) and SIGUSR1 only note that the run should stop."""

    def __enter__(self):
        self.signal = None
        self.previous = {number: signal.signal(number, self._note) for number in SIGNALS}
        return self

    def _note(self, number, frame):
        self.signal = signal.Signals(number).name
        if number == signal.SIGTERM:
            signal.signal(number, self.previous[number])   # a second one: what it did before

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def stop_if_requested(self, step, what, checkpoint):
        """If any process of the job was asked to stop (all of them stop together, after the
        same step): ``checkpoint()``, which writes the checkpoint of ``step`` and returns its
        path, then Preempted. ``what``: the step in words ("iteration 12")."""
        if distributed.sum_over_ranks(float(self.signal is not None)) > 0:
            path = checkpoint()
            raise Preempted(f"{self.signal}: the run stopped after {what} and wrote {path}", step)


def resume_command(step=None):
    """The command line of this process, as typed, resumed from ``step`` (None: the same
    command, which goes on where it stopped: reproduce.py)."""
    flags = [flag for flag in sys.argv[1:] if not flag.startswith("--checkpoint_step")]
    if step is not None:
        flags.append(f"--checkpoint_step={step}")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else ["python"]
    return shlex.join([*launcher, Path(sys.argv[0]).name, *flags])
