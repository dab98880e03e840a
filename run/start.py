"""The start of a run of main.py or train_original.py: the flags, an output folder that can
be written, the device, the seeds and the data."""
import os
import random
import tempfile

import numpy as np
import torch

from config import DataConfig
from dataloader import load_data
from options import parse_args
from run import distributed
from run.errors import UserError


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
