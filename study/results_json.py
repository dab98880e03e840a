"""A study's results.json: what it keeps of the runs' records (per-user errors rounded to
float32's digits, each seed's test users once, a checksum) and how it is read back, checked."""
import json
import shlex
from pathlib import Path

from run.atomic_files import write_json
from study.records import check_checksum, check_numbers, with_checksum
from study.study_options import parse_command_line

PER_USER_DIGITS = 7   # significant digits of the per-user errors in results.json (float32's)


def without_per_user(metrics):
    return None if metrics is None else {name: value for name, value in metrics.items() if name != "per_user"}


def with_rounded_per_user(record):
    """``record`` with the per-user errors that the paired tables read, the squared ones, to
    PER_USER_DIGITS significant digits: what results.json keeps (a run's own record keeps its
    absolute errors too), and what every table is computed from, so that a table renders again
    from results.json to the last digit."""
    per_user = (record["metrics"] or {}).get("per_user")
    if per_user is None:
        return record
    squared = [float(f"{error:.{PER_USER_DIGITS}g}") for error in per_user["squared_error"]]
    return {**record, "metrics": {**record["metrics"], "per_user": {"user": per_user["user"], "squared_error": squared}}}


def with_users_once_per_seed(runs):
    """``runs`` without the test-user ids of their per-user errors where they equal their seed's
    (the first recorded: every method of a seed is tested on the same users), and those ids per
    seed: what results.json keeps, each seed's ids once rather than in each of its runs."""
    test_users = {}
    for record in runs:
        if per_user := (record["metrics"] or {}).get("per_user"):
            test_users.setdefault(str(record["seed"]), per_user["user"])

    def compact(record):
        per_user = (record["metrics"] or {}).get("per_user")
        if per_user is None or per_user["user"] != test_users[str(record["seed"])]:
            return record
        return {**record, "metrics": {**record["metrics"], "per_user": {
            name: errors for name, errors in per_user.items() if name != "user"}}}
    return [compact(record) for record in runs], test_users


def with_test_users(runs, test_users):
    """The runs of a results.json with their test-user ids again (with_users_once_per_seed undone)."""
    def expand(record):
        per_user = (record["metrics"] or {}).get("per_user")
        if per_user is None or "user" in per_user:
            return record
        users = test_users[str(record["seed"])]
        return {**record, "metrics": {**record["metrics"], "per_user": {"user": users, **per_user}}}
    return [expand(record) for record in runs]


def write_results(path, study, records, waiting, paired, reference_records, reference_summary):
    """A study's results.json, kept small: one line, the per-user errors only of the methods in
    the tables (a tuned variant's other runs keep theirs in their own records), each seed's
    users once; ``records`` and ``waiting`` with their per-user errors rounded."""
    runs, test_users = with_users_once_per_seed(
        [record if record["method"] in study.methods or record["model"] is None else
         {**record, "metrics": without_per_user(record["metrics"])} for record in records])
    write_json(path, with_checksum(
               {"dataset": study.name, "command": study.command, "study": study.study_files,
                "data_path": study.data_path, "mode": study.mode, "seeds": study.seeds, "models": study.models,
                "methods": study.methods, "run_flags": study.run_flags, "test_users": test_users,
                "runs": runs, "paired": paired, "waiting_runs": waiting,
                "reference_runs": reference_records, "reference_paired": reference_summary}), indent=None)


def read_results(results_path):
    """The study that a results.json records (its settings from the command it records), its
    runs with their test-user ids again, and the reference's runs; checked first (study/records.py)."""
    recorded = json.loads(Path(results_path).read_text())
    advice = "take it again from git (git checkout), or run its study again"
    check_checksum(recorded, results_path, advice)
    study = parse_command_line(shlex.split(recorded["command"])[2:])
    runs = with_test_users(recorded["runs"], recorded.get("test_users", {}))
    for record in [*runs, *recorded.get("waiting_runs", [])]:
        check_numbers(record, results_path, advice)
    return study, runs, recorded["reference_runs"]


def read_waiting_runs(results_path):
    """The records of a results.json's finished runs that its tables leave out (write_reports'
    ``waiting``); read_results checks them."""
    return json.loads(Path(results_path).read_text()).get("waiting_runs", [])


def runs_own_records(records):
    """The records of the runs themselves among a results.json's: without the tuned variants'
    copies (tuned_records makes them again), and each run that a tuned variant chose with the
    per-user errors that its copy kept."""
    chosen = {(record["seed"], record["model"], record["chosen_run"]): record["metrics"]
              for record in records if "chosen_run" in record}
    return [{**record, "metrics": chosen.get((record["seed"], record["model"], record["method"]), record["metrics"])}
            for record in records if "chosen_run" not in record]
