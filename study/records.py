"""A finished run's record (``<method>.json``) and a study's ``results.json`` are results, not
logs: each carries the SHA-256 of its own content, and a run's RMSE and MAE must be those of
the per-user errors it keeps. Both are checked before a record is reused, restored or
reported, so that an edited or damaged one is refused in one line rather than trusted; and
the runs of a study must come from one data set (their data digest). Records written before
they carried a checksum are checked for their numbers alone, before a data digest for none."""
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


def check_one_data_set(records, here, source):
    """The records' data digests (dataloader.sequences_digest; None in older records) must be
    one, and with ``here`` (this machine's digest of the study's data) that one: a study run
    on two machines can otherwise pool runs made from two orders of the same file."""
    made_from = sorted({record.get("data_digest") for record in records} - {None})
    why = ("the same rating file sequenced otherwise on another machine: ratings that share a date "
           "are ordered as the CPU's sort orders them unless --stable_date_sort=True")
    if len(made_from) > 1:
        raise UserError(f"{source} holds runs made from {len(made_from)} data sets ({', '.join(made_from)}): "
                        f"{why}; their numbers cannot be pooled: run the study again under another --name")
    if here is not None and made_from and made_from != [here]:
        raise UserError(f"{source} holds runs made from other data (digest {made_from[0]}) than this machine "
                        f"makes of them ({here}): {why}; go on with it on the machine that made it, or "
                        "run it again here under another --name (--report_finished still reports it)")
