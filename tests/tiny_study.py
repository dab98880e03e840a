"""The tiny study that the tests of reproduce.py and report.py share (conftest.py runs it once
for the session), and helpers that read what it writes."""
import json
import statistics
from types import SimpleNamespace

from fixtures import write_ratings
import reproduce

DATA = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8"]
BUDGET = ["--pretrain_epochs=1", "--num_train_iterations=2", "--log_interval=1"]
RUN_FLAGS = ["--num_samples=4", "--num_query_set=2", "--batch_size=4", "--pretraining_batch_size=16",
             "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8", "--gru4rec_n_layers=1",
             "--lstm_hidden=8", "--lstm_input_size=4"]
SEEDS = (222, 223)
METHODS = ("basic", "maml", "melo", "melo_normalized")


def make_study(tmp_path_factory):
    """The tiny study (GRU4Rec, seeds 222 and 223, MELO also with normalised weights: 10 runs,
    18 script calls), run once for the test session; tests read what it wrote."""
    root = tmp_path_factory.mktemp("study")
    ratings = write_ratings(root / "data" / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=3)
    argv = [f"--data_path={ratings}", *DATA, *BUDGET, "--models", "gru4rec",
            "--seeds", *map(str, SEEDS), "--normalized_melo", "--name=tiny", f"--results_dir={root / 'results'}",
            "--", *RUN_FLAGS]
    records = reproduce.main(argv)
    return SimpleNamespace(argv=argv, dir=root / "results" / "tiny", ratings=ratings, records=records)


def with_seeds(argv, *seeds):
    flags = list(argv)
    start = flags.index("--seeds") + 1
    flags[start:start + len(SEEDS)] = map(str, seeds)
    return flags


def table_rows(markdown):
    """{first cell: {column: cell}} of the first markdown table in ``markdown``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    lines = [line for line in lines[start:end] if "---" not in line]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header = split[0]
    return {cells[0]: dict(zip(header, cells)) for cells in split[1:]}


def by_seed(markdown):
    """table_rows of a one-model table whose first columns are Model and Seed, by seed."""
    return table_rows(markdown.replace("| Model | ", "| ").replace("| GRU4Rec | ", "| "))


def mean_and_std(cell):
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def file_times(folder):
    """Each file's time of change, but the study's lock (each invocation writes its pid there)."""
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file() and path.name != ".study.lock"}


def metric(study, model, method, name):
    return [r["metrics"][name] for r in study.records if r["model"] == model and r["method"] == method]


def method_rows(markdown):
    """{(model, method): {column: cell}} of the results table (its first)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    end = next((i for i in range(1, len(lines)) if lines[i].startswith("| Model ")), len(lines))
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[:end]]
    return {(cells[0], cells[1]): dict(zip(split[0], cells)) for cells in split[1:]}


def paired_cells(markdown):
    """{(model, difference): {column: cell}} of the paired-differences section."""
    section = markdown[markdown.index("## Paired differences"):]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    end = next((i for i in range(1, len(lines)) if lines[i].startswith("| Model ")), len(lines))
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[:end]]
    return {(cells[0], cells[1]): dict(zip(split[0], cells)) for cells in split[1:]}


def metric_field(study, method, field):
    return [r[field] for r in study.records if (r["model"], r["method"]) == ("gru4rec", method)]


def reference_records(study, scale):
    """Records as benchmarks/reference_study.py writes them: our MAML's errors, and MELO's
    as MAML's times ``scale`` (so MELO − MAML is known exactly)."""
    found = []
    for seed in SEEDS:
        maml = next(r for r in study.records if (r["seed"], r["method"]) == (seed, "maml"))["metrics"]["per_user"]
        for method, factor in (("maml", 1.0), ("melo", scale)):
            squared = [error * factor for error in maml["squared_error"]]
            found.append({"codebase": "reference", "model": "gru4rec", "method": method, "seed": seed,
                          "metrics": {"rmse": statistics.fmean(squared) ** 0.5, "mae": 0.0,
                                      "num_users": len(squared),
                                      "per_user": {"user": maml["user"], "squared_error": squared,
                                                   "absolute_error": squared}}})
    return found


def write_reference(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['model']}_{record['method']}_seed{record['seed']}.json").write_text(json.dumps(record))


def settings(study):
    """What a parsed study computes: every setting but how it was typed and run."""
    return {name: value for name, value in vars(study).items()
            if name not in ("command", "study_files", "jobs", "nproc_per_node", "report_finished")}


