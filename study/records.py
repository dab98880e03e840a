"""A finished run's record (``<method>.json``) and a study's ``results.json`` are results, not
logs: each carries the SHA-256 of its own content, and a run's RMSE and MAE must be those of
the per-user errors it keeps. Both are checked before a record is reused, restored or
reported, so that an edited or damaged one is refused in one line rather than trusted.
Records written before they carried a checksum are checked for their numbers alone."""
import hashlib
import json
import math
import statistics

from run.errors import UserError

CHECKSUM = "sha256"


def digest(value):
    """The SHA-256 of a JSON object's content, without its own checksum field."""
    content = {name: field for name, field in value.items() if name != CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_checksum(value):
    return {**value, CHECKSUM: digest(value)}


def check_checksum(value, source, advice):
    if CHECKSUM in value and value[CHECKSUM] != digest(value):
        raise UserError(f"{source} was edited or damaged: its content does not match the checksum written "
                        f"with it; {advice}")


def check_numbers(record, source, advice):
    """A run's RMSE and MAE against its per-user errors (one test target per user)."""
    metrics = record.get("metrics") or {}
    per_user = metrics.get("per_user") or {}
    for name, errors, of in (("rmse", per_user.get("squared_error"), lambda e: math.sqrt(statistics.fmean(e))),
                             ("mae", per_user.get("absolute_error"), statistics.fmean)):
        if errors and name in metrics and not math.isclose(of(errors), metrics[name], rel_tol=1e-5, abs_tol=1e-6):
            raise UserError(f"{source}: the {name.upper()} of {record['method']} (seed {record['seed']}) is "
                            f"{metrics[name]:.4f}, but its per-user errors give {of(errors):.4f}: it was edited or "
                            f"damaged; {advice}")


def check_record(record, source, advice):
    """A run's record: its checksum (when it has one) and its numbers."""
    check_checksum(record, source, advice)
    check_numbers(record, source, advice)
