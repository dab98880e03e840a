"""What a MAML/MELO checkpoint holds, and how a run resumes from one: the learner, every
optimiser, the task sampler, the step and best validation so far, the random generators and
the flags, so that a killed and resumed run ends with the parameters of one that was not
interrupted (Basic's, in train_original.py, the same way with its own parts). Learning rates are a function of the step (meta_learning/learning_rates.py): a resume with
new rates or a new length only needs the flags."""
import random

import numpy as np
import torch

from options import flags_with
from run import distributed
from run.errors import UserError
from run.run_files import load_matching_state

RESUMABLE = frozenset(flags_with(resume="changes"))
IGNORED = frozenset(flags_with(resume="ignored"))


def training_state(trainer):
    """A MetaTrainer's whole state, to resume it exactly."""
    return {
        "method": trainer.method,
        "iteration": trainer.iteration,
        "best_valid_rmse": trainer.best_valid_rmse,
        "best_step": trainer.best_step,
        "learner": trainer.learner.state_dict(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in trainer.optimizers.items()},
        "sampler": trainer.sampler.state_dict(),
        "rng": rng_state(),
        "args": dict(trainer.files.config.flags),
        "data_digest": trainer.data.digest,
        "resumed_from": trainer.resumed_from,
    }


def check_same_data(state, data, what):
    """An error when the checkpoint ``state`` (``what``: "the checkpoint of step 50") was made
    from other sequences than ``data`` (RatingData.digest; checkpoints made before it was
    kept are not checked): resumed, its run would go on with other users' tasks; tested, its
    numbers would not be its run's."""
    saved = state.get("data_digest")
    if saved is not None and saved != data.digest:
        raise UserError(f"{what} was made from other data than these flags make of {data.stats['path']} here "
                        f"(data digest {saved}, here {data.digest}): the same file is ordered otherwise when "
                        "ratings share a date and the default date sort (the reference's) follows the CPU; "
                        "use it on the machine that made it, or start a new run with --stable_date_sort=True")


def rng_state():
    """Every random generator's state: what dropout and the task draws will do next; under
    torchrun also every process's own dropout stream (call it on every process)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "torch_of_ranks": distributed.gather_objects(torch.get_rng_state())}


def restore_rng(rng):
    """Put the generators back; returns whether this process got its own dropout stream back
    (a checkpoint of as many processes), else it draws a new one (own_dropout_stream)."""
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    of_ranks = rng.get("torch_of_ranks") or []
    if len(of_ranks) == distributed.world_size():
        torch.set_rng_state(of_ranks[distributed.rank()].cpu())
        return True
    return False


def restore(trainer, state, step, resume):
    """Load a checkpoint's learner into a MetaTrainer, to test it; with ``resume`` put the
    whole trainer where the checkpoint left it, after checking that the command line changes
    nothing that a resumed run must keep."""
    check_changed_settings(state["args"], dict(trainer.files.config.flags), step, resume)
    check_same_data(state, trainer.data, f"the checkpoint of step {step}")
    load_matching_state(trainer.learner, state["learner"], f"checkpoint of step {step}", trainer.files.made_by)
    trainer.best_valid_rmse = state["best_valid_rmse"]   # a best checkpoint's own: its test reports it
    if not resume:
        return
    for name, optimizer in trainer.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    trainer.iteration = state["iteration"]
    trainer.best_step = state["best_step"]
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.resumed_from = state.get("resumed_from")
    trainer.own_stream_restored = restore_rng(state["rng"])


def check_changed_settings(saved, ours, step, resume=True):
    """An error for a flag that differs from the checkpoint's and may not change in a resumed
    run, nor when it is tested (the test would adapt with another method); a resume prints
    the others that differ."""
    differs = [name for name in saved if name in ours and saved[name] != ours[name] and name not in IGNORED]
    fixed = [name for name in differs if name not in RESUMABLE]
    if fixed:
        listed = ", ".join(f"--{name}={saved[name]} (now {ours[name]})" for name in fixed)
        if not resume:
            raise UserError(f"the checkpoint of step {step} was made with other settings: {listed}; test it "
                            "with the flags it was trained with")
        raise UserError(f"--checkpoint_step={step} resumes a run made with other settings: {listed}; "
                        "these cannot change in a resumed run: give them as they were, or start a "
                        "new run in another --log_dir")
    if not resume:
        return
    changed = [name for name in differs if name not in ("checkpoint_step", "test", "resume_from")]
    if changed:
        print("Resuming with changed settings: " +
              ", ".join(f"--{name} {saved[name]} -> {ours[name]}" for name in changed))
