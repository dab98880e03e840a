"""Progress of the long loops (Basic's epochs, MAML's and MELO's outer iterations): on a
terminal, tqdm's bars and a line per iteration or epoch, as the reference prints them; written
to a file or a pipe (a cluster's log, nohup, reproduce.py's run logs), no bars and no line per
iteration, but a plain line at most every HEARTBEAT_SECONDS and at every validation, so that a
3,000-iteration run's log is a few hundred lines that ``tail`` and ``grep`` read.

MELO_PROGRESS=bars or MELO_PROGRESS=lines in the environment chooses either form wherever the
output goes.
"""
import os
import sys
import time

from tqdm import tqdm

PROGRESS_VARIABLE = "MELO_PROGRESS"
HEARTBEAT_SECONDS = 30


def bars_wanted():
    """Bars (and a line per iteration), or plain lines: MELO_PROGRESS, else whether standard
    error is a terminal."""
    chosen = os.environ.get(PROGRESS_VARIABLE)
    if chosen in ("bars", "lines"):
        return chosen == "bars"
    return sys.stderr.isatty()


def format_duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Steps ``first`` … ``total`` of a loop named ``name``, shown as a bar or as plain lines;
    ``shown`` False (a torchrun process other than the first) shows nothing."""

    def __init__(self, name, first, total, unit="iteration", shown=True):
        self.name, self.first, self.total, self.unit, self.shown = name, first, total, unit, shown
        self.bars = bars_wanted()
        self.started = self.last_line = time.monotonic()
        self.done = 0
        self.bar = tqdm(range(first, total + 1), initial=first - 1, total=total, desc=name,
                        disable=not (shown and self.bars))

    def __iter__(self):
        for step in self.bar:
            yield step
            self.done += 1
            if not self.bars and time.monotonic() - self.last_line >= HEARTBEAT_SECONDS:
                self.say(self.status(step))

    def seconds_per_step(self):
        return (time.monotonic() - self.started) / max(1, self.done)

    def status(self, step):
        """'MAML iteration 120/3000, 1.05 s/iteration, about 50m24s left'."""
        left = (self.total - step) * self.seconds_per_step()
        return (f"{self.name} {self.unit} {step}/{self.total}, {self.seconds_per_step():.2f} s/{self.unit}, "
                f"about {format_duration(left)} left")

    def every_step(self, line, **postfix):
        """A line for each step (bars only: the reference's), and the bar's figures."""
        if self.bars and self.shown:
            self.bar.set_postfix(postfix)
            tqdm.write(line)

    def validated(self, step, rmse, best_rmse, best_step):
        """The plain line of a validation (the bars' form prints the reference's lines alone)."""
        if not self.bars:
            self.say(f"{self.status(step)}; validation RMSE {rmse:.4f}, best {best_rmse:.4f} at {best_step}")

    def say(self, line):
        if self.shown:
            tqdm.write(line)
            sys.stdout.flush()
        self.last_line = time.monotonic()
