"""A study's finished runs: their records (``<method>.json`` beside each run's log), read
and checked before they are reused or reported, and which of them make whole sets."""
import json

from run.errors import UserError
from study.learning_curves import read_curve
from study.records import CHECKSUM, check_record
from study.study_plan import META_FLAGS, SCRIPT_METHOD


def finished_records(runs_dir):
    return [path for method in SCRIPT_METHOD
            for path in runs_dir.glob(f"**/{method}.json")]


def finished_record(run):
    """A finished run's record, checked (study/records.py); a MAML or MELO run recorded before records
    kept their learning curve gets it from its TensorBoard events."""
    record = json.loads(run.record_path.read_text())
    check_record(record, run.record_path, f"delete it to run {run.label} again")
    record.pop(CHECKSUM, None)
    if "curve" not in record:
        record["curve"] = learning_curve(run)
    return record


def learning_curve(run):
    """A MAML or MELO run's validation curve (learning_curves.read_curve), None for other runs."""
    return read_curve(run.files.events) if run.method in META_FLAGS else None


def finished_so_far(runs):
    """The records of --report_finished: those of the runs of each model and seed whose runs
    have all finished, with their seed's mean-rating baseline (every method of a model is
    averaged over the same seeds), and those of the other finished runs, which wait."""
    sets = {}
    for run in runs:
        sets.setdefault((run.seed, run.model), []).append(run)
    finished = {key for key, members in sets.items() if all(run.record_path.is_file() for run in members)}
    whole = [(run.seed, run.model) in finished and (
        run.model is not None or any(seed == run.seed and model is not None for seed, model in finished))
        for run in runs]
    waiting = [finished_record(run) for run, in_whole in zip(runs, whole) if run.record_path.is_file() and not in_whole]
    if not any(whole) and not waiting:
        raise UserError("no run of the study has finished yet: nothing to report")
    return [finished_record(run) for run, in_whole in zip(runs, whole) if in_whole], waiting
