"""What main.py and train_original.py share: errors for the user, the start of a run
(flags, output folder, device, seeds, data), and TensorBoard's curves."""
import os
import random
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import distributed
from atomic_files import WriteError
from config import DataConfig
from dataloader import DataError, load_data
from options import FlagError, parse_args
from preemption import PREEMPTED_STATUS, Preempted, resume_command

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


def setup(argv=None, output_dir=lambda args: args.log_dir):
    """Parse the command line, check that ``output_dir(args)`` can be written, choose the
    device, seed everything and load the data."""
    args = parse_args(argv)
    make_dirs(output_dir(args))  # before the data: a bad folder should not cost a load
    device = distributed.start(select_device(args.device))
    seed_everything(args.random_seed)
    return args, device, load_data(DataConfig.from_args(args))


def select_device(name=None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device={name} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} asks for CUDA, which this machine does not have; "
                        f"leave --device out to use the CPU")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_dirs(*paths):
    """Create folders, with a clear error when that is not allowed."""
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
            probe.close()
        except OSError as error:
            raise UserError(f"cannot write to {path}: {error.strerror}; choose another folder "
                            f"with --log_dir / --pretrain_log_dir") from None


# --- what both trainers do ----------------------------------------------------------------
def log_metrics(writer, split, metrics, step):
    """The MSE, RMSE and MAE of ``split`` (train / valid) to TensorBoard."""
    for key in ("mse", "rmse", "mae"):
        writer.add_scalar(f"{split}/{key.upper()}loss", metrics[key], step)
