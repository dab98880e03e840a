"""A run's files: the folder named by what makes the run its own, its checkpoints and test
results, and where Basic leaves its pretrained files for MAML and MELO (run/pretrained.py).

    {--log_dir or --pretrain_log_dir}/{data folder}-{file}_seed{seed}_{model}_{digest}/
        state/{model}_{step}_best_{mode}_{method}.pt     MAML/MELO, when the validation improved
        state/{model}_{step}_{mode}_{method}.pt          MAML/MELO, at every validation
        state/{model}_{step}_no_meta_best                Basic, at every improving epoch
        state/<checkpoint>_test.json                     the test of a checkpoint
        embedding/, pretrained/                          Basic with --save_pretrained=True
        runs/{model}_{mode}_{method}/                    TensorBoard
"""
import contextlib
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from meta_learning import evaluation
from options import FLAGS
from run import distributed
from run.atomic_files import (TEMPORARY_PREFIX, DamagedFile, LockHeld, WriteError, exclusive_lock,
                              load_checked, remove_temporaries, save_checked, write_json)
from run.errors import UserError
from run.start import make_dirs

DATA_IDENTITY = tuple(flag.name for flag in FLAGS if flag.identity == "data")
# MAML and MELO: also everything else that changes what they compute (the data file counts by content)
META_IDENTITY = tuple(flag.name for flag in FLAGS
                      if (flag.resume == "fixed" or flag.identity == "training") and flag.name != "data_path")
META_METHODS = ("maml", "melo")


@functools.lru_cache(maxsize=16)
def _content_digest(path, size, modified):
    """The SHA-256 of a file's content (cached while its size and time stay the same)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(config, method="basic"):
    """The settings that make a run's files its own; stored in each of them and compared when
    one is loaded. For every run: the data file (its folder, name, size and content: a moved
    copy of the same file is the same data, a file edited in place is not), the flags of the
    data and the model's shape; for MAML and MELO also every other setting that changes what
    they compute (options.Flag)."""
    data, flags = Path(config.data_path), config.flags
    identity = {"data": f"{data.parent.name}/{data.name}",
                "data_bytes": data.stat().st_size if data.is_file() else None, "model": config.model}
    if data.is_file():
        identity["data_sha256"] = _content_digest(str(data.resolve()), data.stat().st_size, data.stat().st_mtime_ns)
    identity.update({name: flags[name] for name in DATA_IDENTITY})
    identity.update({flag.name: flags[flag.name] for flag in FLAGS if config.model in flag.shape_of})
    if method in META_METHODS:
        identity.update({name: flags[name] for name in META_IDENTITY})
    return identity


def run_folder(config, root, method="basic"):
    """The folder of this run's files under ``root`` (--log_dir or --pretrain_log_dir):
    ``<data folder>-<file>_seed<seed>_<model>_<digest of the identity>``; main.py finds
    Basic's embedding under --pretrain_log_dir by Basic's identity."""
    identity = run_identity(config, method)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    data = Path(config.data_path)
    return Path(root) / f"{data.parent.name}-{data.stem}_seed{config.random_seed}_{config.model}_{digest}"


def check_identity(saved, config, what, made_by, method="basic"):
    """A clear error when a file was made for other data or settings than this run's."""
    ours = run_identity(config, method)
    differs = [f"{key} {saved.get(key)!r} (now {value!r})" for key, value in ours.items() if saved.get(key) != value]
    if differs:
        raise UserError(f"{what} was made for other data or settings: {', '.join(differs)}; {made_by}")


def checkpoint_steps_regex(pattern):
    """A regular expression of the file names of ``pattern``, a format string with ``{step}``."""
    return re.compile("^" + re.escape(pattern).replace(re.escape("{step}"), r"(\d+)") + "$")


def checkpoint_steps(directory, pattern):
    """Steps of the checkpoints in ``directory`` whose names match ``pattern``, a format
    string with ``{step}`` (e.g. ``'bert4rec_{step}_best_ml-1m_melo.pt'``)."""
    regex = checkpoint_steps_regex(pattern)
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(regex.match, os.listdir(directory)) if m)


def load_matching_state(module, state, what, made_by):
    """``module.load_state_dict(state)`` with a clear error when the sizes differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"{what} does not fit this model ({detail}); it was made with other "
                        f"flags or data: {made_by}") from None


def refuse_non_finite(state, what, advice):
    """An error when a state dict holds a NaN or an infinity."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what} holds non-finite values in {name}; {advice}")


class RunFiles:
    """The files of one run of ``method`` ("basic", "maml", "melo" or "mean_rating") of the
    RunFilesConfig ``config``, under its --log_dir (--pretrain_log_dir for Basic)."""

    def __init__(self, config, method):
        self.config = config
        self.method = method
        root = config.pretrain_log_dir if method == "basic" else config.log_dir
        self.folder = run_folder(config, root, method)
        self.state = self.folder / "state"
        self.events = self.folder / "runs" / f"{config.model}_{config.mode}_{method}"
        script = "train_original.py" if method == "basic" else "main.py"
        self.root_flag = f"--{'pretrain_log_dir' if method == 'basic' else 'log_dir'}={root}"
        self.made_by = f"{script} with {self.root_flag} and the same --model/--mode/method"

    @property
    def identity(self):
        return run_identity(self.config, self.method)

    def make(self):
        """The run's state folder, with a clear error when it cannot be written."""
        make_dirs(self.state)

    def pattern(self, best=True):
        """A checkpoint's file name with ``{step}`` for its step: the best validations', or with
        ``best=False`` every validation's (and a stopped run's); Basic's best epochs', or with
        ``best=False`` a stopped run's."""
        model, mode = self.config.model, self.config.mode
        if self.method == "basic":   # the one a stopped run resumes from: without "_best"
            return f"{model}_{{step}}_no_meta{'_best' if best else ''}"
        return f"{model}_{{step}}_{'best_' if best else ''}{mode}_{self.method}.pt"

    def checkpoint(self, step, best=True):
        return self.state / self.pattern(best).format(step=step)

    def steps(self, best=True):
        return checkpoint_steps(self.state, self.pattern(best))

    def results(self, step=None, best=True):
        """The JSON of the test of a checkpoint, beside it (the mean-rating baseline's in the folder)."""
        if self.method == "mean_rating":
            return self.folder / f"mean_rating_{self.config.mode}_test.json"
        return self.state / f"{self.checkpoint(step, best).name.removesuffix('.pt')}_test.json"

    def save(self, state, step, best=True):
        """A checkpoint, written whole or not at all, with the run's identity and its checksum
        inside; a failed write is a one-line error that names the last good checkpoint."""
        try:
            save_checked({**state, "identity": self.identity}, self.checkpoint(step, best))
        except WriteError as error:
            raise UserError(f"{error}; {self._last_good(step, 'free some space and resume it')}") from None

    def _last_good(self, step, then):
        """Advice that names the last checkpoint before ``step``, which a resume can use."""
        steps = [earlier for earlier in sorted({*self.steps(best=False), *self.steps(best=True)}) if earlier < step]
        if not steps:
            return "no earlier checkpoint of this run is kept"
        return f"the last good checkpoint is step {steps[-1]}: {then} with --checkpoint_step={steps[-1]}"

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's lock (``.{method}.lock`` in its folder) while it trains: a second run of
        the same folder and method stops
        at once, naming the one that holds it (the OS lets go when a process dies). Temporary
        files left by a killed run are cleaned up once the lock is held."""
        if not distributed.is_main():   # rank 0 alone writes
            yield
            return
        try:
            with exclusive_lock(self.lock_path):
                self._remove_temporaries()
                yield
        except LockHeld as holder:
            raise UserError(f"{self.state} is in use by a {self.method.upper()} run of these settings "
                            f"({holder}); wait for it to end, or run with other settings or another "
                            f"{self.root_flag.split('=')[0]}") from None

    @property
    def lock_path(self):
        """The run's lock file (``lock``), which whoever deletes the run's folder holds too."""
        return self.folder / f".{self.method}.lock"

    def _remove_temporaries(self):
        """The temporary files that a killed run of this folder and method left: of its
        checkpoints, their tests' JSON, and Basic's pretrained files."""
        for leftover in self.state.glob(f"{TEMPORARY_PREFIX}*"):   # ".<file name>.<random>"
            if self._own_file(leftover.name[len(TEMPORARY_PREFIX):].rpartition(".")[0]):
                leftover.unlink(missing_ok=True)
        if self.method == "basic":
            for path in pretrained_paths(self.config).values():
                remove_temporaries(path)

    def _own_file(self, name):
        """Whether ``name`` in state/ is one of this run's checkpoints or its test's JSON."""
        stem = name.removesuffix("_test.json")
        return any(checkpoint_steps_regex(self.pattern(best)).match(candidate)
                   for best in (True, False) for candidate in (name, stem, f"{stem}.pt"))

    def report_test(self, metrics, title, step=None, best=True, **extra):
        """Print a test's metrics and write them, with the flags and the run's identity, beside
        the checkpoint tested; returns the metrics."""
        evaluation.print_test(metrics, title)
        path = self.results(step, best)
        write_json(path, evaluation.test_record(metrics, dict(self.config.flags), method=self.method, checkpoint_step=step,
                                                identity=self.identity, **extra))
        print(f"Results written to {path}")
        return metrics

    def print_summary(self, best_step, best_rmse):
        """The end of a training run, in the reference's words, and how to test it."""
        print("-------------------------------------------------")
        print("Model with the best validation RMSE loss is saved.")
        print(f"Best step: {best_step}")
        print(f"Best RMSE loss: {best_rmse:.4f}")
        print(f"Checkpoints are in {self.state}; test the best one with the same flags and "
              f"--test --checkpoint_step={best_step}")

    def step_to_test(self, best=True):
        """--checkpoint_step, or without it the highest step with a checkpoint."""
        if self.config.checkpoint_step >= 0:
            return self.config.checkpoint_step
        steps = self.steps(best)
        if not steps:
            raise UserError(f"nothing to test: no checkpoint {self.pattern(best).format(step='N')} in "
                            f"{self.state}; {self._what_exists(best)}")
        print(f"Testing the latest checkpoint, step {steps[-1]}")
        return steps[-1]

    def load(self, step, best, device):
        """The checkpoint of ``step``, checked to be this run's, whole and finite. A step's
        every-validation checkpoint, when it is missing (a run stopped between the two),
        is its best one: both hold the whole state. A missing one is reported with the steps
        that do exist, and the runs of other settings beside this one."""
        path = self.checkpoint(step, best)
        if not path.is_file() and not best and self.checkpoint(step, best=True).is_file():
            path = self.checkpoint(step, best=True)
        if not path.is_file():
            raise UserError(f"no checkpoint {path} for step {step}; {self._what_exists(best)}")
        print(f"Loading checkpoint from {path}")  # the reference's line: which file, --test_best or not
        try:
            state = load_checked(path, map_location=device, weights_only=False)
        except Exception as error:  # a damaged or foreign file: say which and why
            reason = error if isinstance(error, DamagedFile) else f"cannot read checkpoint {path}: {error}"
            raise UserError(f"{reason}; {self._last_good(step, 'resume or test it')}") from None
        if "identity" not in state:
            raise UserError(f"{path} is damaged: it lost its run's identity; {self._last_good(step, 'resume or test it')}")
        check_identity(state["identity"], self.config, f"checkpoint of step {step}",
                       f"it belongs to another run: give that run's flags, or another {self.root_flag.split('=')[0]}",
                       self.method)
        refuse_non_finite(state.get("learner", state.get("model", {})), f"checkpoint {path}",
                          self._last_good(step, "resume or test it"))
        return state

    def load_other(self, path, device):
        """Another run's checkpoint (--resume_from) of the same data and model, whole and finite."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--resume_from={path}: no such file; give a checkpoint of a run of this data and model")
        try:
            state = load_checked(path, map_location=device, weights_only=False)
        except Exception as error:  # a damaged or foreign file: say which and why
            raise UserError(f"cannot read checkpoint {path}: {error}") from None
        check_identity(state.get("identity", {}), self.config, f"--resume_from={path}",
                       "give the data and model flags of the run that wrote it")
        refuse_non_finite(state.get("learner", {}), f"checkpoint {path}", "give another checkpoint")
        return state

    def _what_exists(self, best):
        steps = self.steps(best)
        found = (f"steps with a checkpoint: {', '.join(map(str, steps))}" if steps
                 else f"no checkpoint of this kind in {self.state}; {self.made_by} writes them")
        others = sorted(folder for folder in self.folder.parent.glob("*/state")
                        if folder.parent != self.folder and checkpoint_steps(folder, self.pattern(best)))
        if others:
            found += (" (the same folder holds runs of other data or settings: "
                      + "; ".join(self._how_it_differs(folder, best) for folder in others[:3]) + ")")
            if self.method in META_METHODS:
                found += "; to go on from another run's checkpoint with these settings, give --resume_from=ITS_FILE"
        return found

    def _how_it_differs(self, state_folder, best):
        """Another run folder's name and the settings in which its last checkpoint differs from ours."""
        last = state_folder / self.pattern(best).format(step=checkpoint_steps(state_folder, self.pattern(best))[-1])
        try:
            theirs = load_checked(last, map_location="cpu", weights_only=False).get("identity", {})
        except Exception:  # an unreadable checkpoint: its folder's name will do
            return state_folder.parent.name
        ours = self.identity
        def shown(value):   # a digest by its first digits
            return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else value

        differs = [f"{key} {shown(theirs.get(key))} there, {shown(value)} here" for key, value in ours.items()
                   if theirs.get(key) != value]
        return f"{state_folder.parent.name}: {', '.join(differs) or 'other settings'}"

    def refuse_earlier_run(self, what):
        """Before a new run writes its checkpoints: an error when an earlier run with these
        settings left some, or, with --overwrite, delete them and their test results."""
        patterns = {self.pattern(best=False), self.pattern(best=True)}
        found = sorted({step for pattern in patterns for step in checkpoint_steps(self.state, pattern)})
        if not found:
            return
        if not self.config.overwrite:
            raise UserError(f"{self.state} holds checkpoints of an earlier {what} run with these settings "
                            f"(steps {', '.join(map(str, found))}): resume it with --checkpoint_step={found[-1]}, "
                            "test it with --test, or start it again with --overwrite=True, which deletes them")
        for best in {False, True}:
            for step in self.steps(best):
                self.checkpoint(step, best).unlink(missing_ok=True)
                self.results(step, best).unlink(missing_ok=True)
        print(f"--overwrite=True: deleted the earlier {what} run's checkpoints in {self.state}")


def pretrained_paths(config):
    """Where train_original.py --save_pretrained=True puts Basic's embedding and its whole
    model, in the names the reference gives them."""
    folder = run_folder(config, config.pretrain_log_dir)
    sizes = f"{config.bert_hidden_units}_{config.bert_num_blocks}_{config.bert_num_heads}"
    embedding = f"{config.model}_embedding_{config.mode}" + (f"_{sizes}" if config.model in ("bert4rec", "sasrec") else "")
    return {"embedding": folder / "embedding" / embedding,
            "model": folder / "pretrained" / f"{config.model}_pretrained_{config.mode}_{sizes}"}
