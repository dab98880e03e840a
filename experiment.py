"""What main.py and train_original.py share: errors for the user, devices, seeds, run
identities and folders, and the checkpoints a folder holds."""
import hashlib
import json
import os
import random
import re
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import distributed
from config import DataConfig
from dataloader import DataError, load_data
from options import FlagError, parse_args



class UserError(Exception):
    """A problem the user can fix; reported as one line, never a traceback."""


def run_cli(main):
    """Run ``main()``; report user errors in one line (exit 2), interruption as 130. Scripts
    exit quietly on Ctrl-C while they import (their first lines); from here on it raises."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except distributed.PeerFailure as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except FlagError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)
    except (UserError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoints already written are kept", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.stop()


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


def checkpoint_pattern(model, mode, method, best=True):
    """The file name of a checkpoint with ``{step}`` for its step, as train_original.py
    (``method="basic"``: its best epochs) and main.py (MAML, MELO: the best validations, or
    with ``best=False`` every validation) write them (README, "Checkpoints")."""
    if method == "basic":
        return f"{model}_{{step}}_no_meta_best"
    return f"{model}_{{step}}_{'best_' if best else ''}{mode}_{method}.pt"


def test_results_name(checkpoint_name):
    """The file name of the test results of a checkpoint, beside it."""
    return f"{checkpoint_name.removesuffix('.pt')}_test.json"


def mean_rating_results_name(mode):
    """The file name of the mean-rating baseline's test results (main.py --test_baseline)."""
    return f"mean_rating_{mode}_test.json"


def checkpoint_steps(directory, pattern):
    """Steps of the checkpoints in ``directory`` whose names match ``pattern``, a format
    string with ``{step}`` (e.g. ``'bert4rec_{step}_best_ml-1m_melo.pt'``)."""
    regex = re.compile("^" + re.escape(pattern).replace(re.escape("{step}"), r"(\d+)") + "$")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(regex.match, os.listdir(directory)) if m)


def step_to_test(args, directory, pattern, made_by):
    """--checkpoint_step, or without it the highest step with a checkpoint in ``directory``."""
    if args.checkpoint_step >= 0:
        return args.checkpoint_step
    steps = checkpoint_steps(directory, pattern)
    if not steps:
        raise UserError(f"nothing to test: no checkpoint {pattern.format(step='N')} in {directory}; "
                        f"train first with {made_by}")
    print(f"Testing the latest checkpoint, step {steps[-1]}")
    return steps[-1]


def load_checkpoint(directory, pattern, step, device, made_by):
    """Load the checkpoint ``pattern.format(step=step)``; a missing one is reported with
    the steps that do exist and the command (``made_by``) that writes them."""
    path = Path(directory) / pattern.format(step=step)
    if not path.is_file():
        steps = checkpoint_steps(directory, pattern)
        available = (f"steps with a checkpoint: {', '.join(map(str, steps))}" if steps
                     else f"no checkpoint of this kind in {directory}; {made_by} writes them")
        run = Path(directory).parent
        others = sorted(folder.parent.name for folder in run.parent.glob("*/state")
                        if folder.parent != run and checkpoint_steps(folder, pattern))
        if others:
            available += (f" (the same folder holds runs of other data or settings, whose flags differ "
                          f"from these: {', '.join(others)})")
        raise UserError(f"no checkpoint {path} for step {step}; {available}")
    print(f"Loading checkpoint from {path}")  # the reference's line: which file, --test_best or not
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # a corrupt or foreign file: say which and why
        raise UserError(f"cannot read checkpoint {path}: {error}") from None


def load_matching_state(module, state, what, made_by):
    """``module.load_state_dict(state)`` with a clear error when the sizes differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"{what} does not fit this model ({detail}); it was made with other "
                        f"flags or data: {made_by}") from None


# What makes one run's files differ from another's, apart from the method (which main.py's
# file names carry): the data and how it is read and split, the seed, the model and its shape.
DATA_SETTINGS = ("mode", "min_item", "min_sequence", "num_test_data", "val_size", "random_seed",
                 "drop_duplicates", "stable_date_sort", "max_seq_len")
MODEL_SHAPES = {"bert4rec": ("bert_hidden_units", "bert_num_blocks", "bert_num_heads"),
                "sasrec": ("bert_hidden_units", "bert_num_blocks", "bert_num_heads"),
                "ncf": ("bert_hidden_units",),
                "gru4rec": ("gru4rec_embedding_dim", "gru4rec_hidden_size", "gru4rec_n_layers"),
                "narm": ("narm_embedding_dim", "narm_hidden_size", "narm_n_layers")}


def run_identity(args):
    """The settings that make a run's files its own; stored in each of them and compared when
    one is loaded. The data file counts by its folder, name and size, so a moved copy of
    the same file is the same data."""
    data = Path(args.data_path)
    identity = {"data": f"{data.parent.name}/{data.name}",
                "data_bytes": data.stat().st_size if data.is_file() else None, "model": args.model}
    identity.update({name: getattr(args, name) for name in (*DATA_SETTINGS, *MODEL_SHAPES[args.model])})
    return identity


def run_folder(args, root):
    """The folder of this run's files under ``root`` (--log_dir or --pretrain_log_dir):
    ``<data folder>-<file>_seed<seed>_<model>_<digest of the identity>``. Basic and MAML/MELO
    of the same data and model share it, so main.py finds Basic's embedding there."""
    identity = run_identity(args)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    data = Path(args.data_path)
    return Path(root) / f"{data.parent.name}-{data.stem}_seed{args.random_seed}_{args.model}_{digest}"


def check_identity(saved, args, what, made_by):
    """A clear error when a file was made for other data or settings than this run's."""
    ours = run_identity(args)
    differs = [f"{key} {saved.get(key)!r} (now {value!r})" for key, value in ours.items() if saved.get(key) != value]
    if differs:
        raise UserError(f"{what} was made for other data or settings: {', '.join(differs)}; {made_by}")


def pretrained_embedding_path(args):
    """Where train_original.py --save_pretrained=True puts the embedding part."""
    name = f"{args.model}_embedding_{args.mode}"
    if args.model in ("bert4rec", "sasrec"):
        name += f"_{args.bert_hidden_units}_{args.bert_num_blocks}_{args.bert_num_heads}"
    return run_folder(args, args.pretrain_log_dir) / "embedding" / name


def pretrained_model_path(args):
    """Where train_original.py --save_pretrained=True puts the whole model."""
    name = (f"{args.model}_pretrained_{args.mode}_{args.bert_hidden_units}_"
            f"{args.bert_num_blocks}_{args.bert_num_heads}")
    return run_folder(args, args.pretrain_log_dir) / "pretrained" / name


def refuse_earlier_run(directory, patterns, args, what):
    """Before a new run writes into ``directory``: an error when checkpoints of an earlier
    run with these settings are there (``patterns`` with ``{step}``), or, with --overwrite,
    delete them and their test results."""
    directory = Path(directory)
    found = sorted({step for pattern in patterns for step in checkpoint_steps(directory, pattern)})
    if not found:
        return
    if not args.overwrite:
        raise UserError(f"{directory} holds checkpoints of an earlier {what} run with these settings "
                        f"(steps {', '.join(map(str, found))}): resume it with --checkpoint_step={found[-1]}, "
                        "test it with --test, or start it again with --overwrite=True, which deletes them")
    for pattern in patterns:
        for step in checkpoint_steps(directory, pattern):
            for path in (directory / pattern.format(step=step), directory / test_results_name(pattern.format(step=step))):
                path.unlink(missing_ok=True)
    print(f"--overwrite=True: deleted the earlier {what} run's checkpoints in {directory}")


# --- what both trainers do ----------------------------------------------------------------
MIN_LSTM_LR = 1e-2  # the end of the LSTM encoder's cosine learning-rate schedule


def log_metrics(writer, split, metrics, step):
    """The MSE, RMSE and MAE of ``split`` (train / valid) to TensorBoard."""
    for key in ("mse", "rmse", "mae"):
        writer.add_scalar(f"{split}/{key.upper()}loss", metrics[key], step)


def print_training_summary(best_step, best_rmse, save_dir):
    """The end of a training run, in the reference's words, and how to test it."""
    print("-------------------------------------------------")
    print("Model with the best validation RMSE loss is saved.")
    print(f"Best step: {best_step}")
    print(f"Best RMSE loss: {best_rmse:.4f}")
    print(f"Checkpoints are in {save_dir}; test the best one with the same flags and "
          f"--test --checkpoint_step={best_step}")


def pretraining_command(args):
    """The train_original.py command that writes the pretrained files for these flags."""
    return (f"python train_original.py --model={args.model} --mode={args.mode} "
            f"--data_path={args.data_path} --pretrain_log_dir={args.pretrain_log_dir} "
            f"--save_pretrained=True (with the same model and data flags)")
