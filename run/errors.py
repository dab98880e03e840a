"""How main.py, train_original.py and the study scripts end: a problem the user can fix
as one line (UserError), a diverged training, an interruption, a run stopped by its
scheduler with the command that resumes it."""
import os
import signal
import sys
from pathlib import Path

from options import FlagError
from ratings.rating_files import DataError
from run import distributed
from run.atomic_files import WriteError
from run.preemption import PREEMPTED_STATUS, Preempted, resume_command

DEBUG_VARIABLE = "MELO_DEBUG"  # set (to anything but 0): an error's traceback, behind its one line


class UserError(Exception):
    """A problem the user can fix; reported as one line, never a traceback."""


DIVERGED_STATUS = 3   # the exit status of a training stopped by Diverged


class Diverged(UserError):
    """Training met a non-finite loss or validation; its checkpoints until then are kept."""


def run_cli(main):
    """Run ``main()``; report user errors in one line (exit 2; a diverged training 3),
    interruption as 130, a run stopped by SIGTERM or SIGUSR1 with the command that resumes it
    (PREEMPTED_STATUS). Scripts exit quietly on Ctrl-C while they import (their first lines);
    from here on it raises.
    With MELO_DEBUG=1 in the environment an error is raised with its traceback instead, and
    with the exception that caused it (a corrupt file's, say)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except Preempted as stop:
        if distributed.is_main():
            print(f"{stop}; resume it with: {resume_command(stop.step)}", file=sys.stderr)
        sys.exit(PREEMPTED_STATUS)
    except (distributed.PeerFailure, FlagError, UserError, DataError, WriteError) as error:
        if os.environ.get(DEBUG_VARIABLE, "0") != "0":
            error.__suppress_context__ = False
            raise
        print(one_line_error(error), file=sys.stderr)
        sys.exit(1 if isinstance(error, distributed.PeerFailure) else DIVERGED_STATUS if isinstance(error, Diverged)
                 else 2)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoints already written are kept", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.stop()


def one_line_error(error):
    if isinstance(error, FlagError):
        return f"{Path(sys.argv[0]).name}: error: {error} (--help lists the flags)"
    return f"error: {error}"
