"""A MAML or MELO run's learning curve, read back from the TensorBoard events that main.py
writes at every validation: the validation RMSE, the mean LSLR inner rate, and MELO's mean
encoder weight, against the outer iteration.

The *effective inner step* is what a support example's loss gradient is multiplied by in the
inner loop: MAML's mean rate; MELO's mean rate times its encoder's mean weight (the weight
multiplies the loss, so it scales the step as the rate does).
"""
import statistics
from pathlib import Path

CURVE_DIGITS = 5   # significant digits kept in a record (results.json stays small)


def _rounded(values):
    return [float(f"{value:.{CURVE_DIGITS}g}") for value in values]


def _by_step(scalars):
    return {event.step: event.value for event in scalars}


def read_curve(events_dir):
    """The curve of the run whose events are in ``events_dir``: {"step", "valid_rmse",
    "inner_lr", "encoder_weight"} (lists over the validations; encoder_weight None for MAML), or
    None when the folder holds no validation. A resumed run's curve after its checkpoint,
    written by the run that was stopped, is dropped (main.py purges it)."""
    if not Path(events_dir).is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "valid/RMSEloss" not in tags:
        return None
    rmse = _by_step(events.Scalars("valid/RMSEloss"))
    rates = [_by_step(events.Scalars(tag)) for tag in tags if tag.startswith("inner_lr/")]
    weights = [_by_step(events.Scalars(tag)) for tag in tags if tag.startswith("encoder_weight/")]
    steps = sorted(rmse)
    return {"step": steps,
            "valid_rmse": _rounded(rmse[step] for step in steps),
            "inner_lr": _rounded(statistics.fmean(rate[step] for rate in rates) for step in steps),
            # the mean over the ratings that the validation's batch had (an absent rating has no weight)
            "encoder_weight": _rounded(statistics.fmean(weight[step] for weight in weights if step in weight)
                                       for step in steps)
            if weights else None}


def effective_step(curve):
    """The effective inner step at each validation of ``curve`` (see the module's docstring)."""
    if curve["encoder_weight"] is None:
        return list(curve["inner_lr"])
    return [rate * weight for rate, weight in zip(curve["inner_lr"], curve["encoder_weight"])]
