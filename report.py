"""A study's reports: the results table with the paired differences (table.md), the
reference code's runs beside ours, the data statistics (dataset.md), the figures (study/figures.py:
per_rating.png, curves.png) and every record (results.json); and the forest plot of every
committed study.

    python report.py results/quick/results.json    # table.md and the figures again, from the JSON
    python report.py --forest                      # results/forest.png from every committed results.json
    python report.py results/ml-100k-3000/results.json --minus results/ml-100k-3000-at-300/results.json
                                                   # each method at 3,000 iterations minus at 300, same users
"""
import argparse
import json
import shlex
import statistics
from pathlib import Path

from meta_learning.evaluation import paired_rmse_difference
from options import FLAGS
from run.errors import UserError, run_cli
from study.figures import plot_curves, plot_forest, plot_per_rating, seeds_by_model, seeds_phrase
from study.results_json import read_results, read_waiting_runs, with_rounded_per_user, write_results
from study.study_options import PROJECT_DIR, TITLES, TUNED_VARIANTS, VARIANTS

METRICS = ("rmse", "mae")
REFERENCE_METHODS = ("maml", "melo")   # what benchmarks/reference_study.py writes
MULTI_STEP_LOSS_END = next(flag.default for flag in FLAGS if flag.name == "multi_step_loss_num_epochs")
FOREST_METHODS = ("melo", "melo_rating_blind")   # each against MAML
FOREST_PATH = PROJECT_DIR / "results" / "forest.png"


def metric_values(records, model, method, metric):
    """One value per seed."""
    return [r["metrics"][metric] for r in records if r["model"] == model and r["method"] == method]


def mean_cell(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def overall_rows(paired):
    """Each (model, method, versus)'s difference over all its seeds: pooled, or its one seed's."""
    return {(row["model"], row["method"], row["versus"]): row for row in paired}   # pooled comes last


def best_steps(records, model, method):
    """The step each seed's run tested: Basic's epoch, MAML's / MELO's best-validation iteration."""
    return ", ".join(str(r["checkpoint_step"]) for r in records
                     if (r["model"], r["method"]) == (model, method) and r.get("checkpoint_step") is not None)


def method_row(records, model, method, overall):
    return [TITLES[model], TITLES[method],
            *(mean_cell(metric_values(records, model, method, metric)) for metric in METRICS),
            *(interval_cell(overall[model, method, other]) if (model, method, other) in overall else ""
              for other in ("maml", "melo")),
            best_steps(records, model, method)]


def results_table(study, records, paired):
    """One row per model and method: RMSE, MAE, the pooled difference from MAML and from MELO."""
    header = ["Model", "Method", "RMSE", "MAE", "− MAML RMSE [95 %]", "− MELO RMSE [95 %]", "Best step"]
    by_model = seeds_by_model(study, records)
    overall = overall_rows(paired)
    rows = [method_row(records, model, method, overall) for model in by_model for method in study.methods]
    baseline = [mean_cell(metric_values(records, None, "mean_rating", metric)) for metric in METRICS]
    rows.append(["", "Mean rating", *baseline, "", "", ""])
    test_users = metric_values(records, None, "mean_rating", "num_users")[0]
    spread = seeds_phrase(by_model, "mean ± sample standard deviation over seeds")
    extra = f"; flags given to every run: `{shlex.join(study.run_flags)}`" if study.run_flags else ""
    return (f"# Results: {study.name}\n\n"
            f"Test RMSE and MAE in stars on the same {test_users} cold-start test users for every "
            f"method ({spread}). Basic: {study.pretrain_epochs} epochs; MAML and MELO: "
            f"{study.num_train_iterations} iterations from Basic's embedding{extra}.\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"− MAML, − MELO: the method's test RMSE minus MAML's (MELO's) on the same users, the "
            f"seeds' users pooled, with its 95 % paired-bootstrap interval (per seed below): "
            f"negative when the method's error is lower. Best step: the checkpoint each seed tested "
            f"(Basic: its best epoch; MAML and MELO: the outer iteration of their best validation). "
            f"Mean rating: the training users' mean rating predicted for every test target (no model).\n")


def per_user_errors(records, model, method, seed):
    """A run's per-user test errors, None when it has none (recorded before they were kept)."""
    record = next((r for r in records if (r["model"], r["method"], r["seed"]) == (model, method, seed)), None)
    return None if record is None else record["metrics"].get("per_user")


def paired_rows(records, model, method, other, seeds, other_records=None):
    """``method``'s test RMSE minus ``other``'s on the same users (``other``'s run among
    ``other_records`` when given: another study's), with its 95 % paired-bootstrap interval: per
    seed, and pooled over the seeds (their users together) when there are several."""
    rows, pooled, pooled_other = [], [], []
    for seed in seeds:
        errors = per_user_errors(records, model, method, seed)
        other_errors = per_user_errors(records if other_records is None else other_records, model, other, seed)
        if errors is None or other_errors is None:
            continue
        if errors["user"] != other_errors["user"]:
            raise UserError(f"seed {seed} {model}: {TITLES[method]} and {TITLES[other]} were tested on "
                            "other users; run both again")
        rows.append({"model": model, "method": method, "versus": other, "seed": seed,
                     **paired_rmse_difference(errors["squared_error"], other_errors["squared_error"])})
        pooled += errors["squared_error"]
        pooled_other += other_errors["squared_error"]
    if len(rows) > 1:
        rows.append({"model": model, "method": method, "versus": other, "seed": "pooled",
                     **paired_rmse_difference(pooled, pooled_other)})
    return rows


def paired_differences(records, study):
    """Each method after MAML against MAML and against Basic, each after MELO against MELO, and
    MELO and its variants against each tuned variant of MAML, per model (see paired_rows)."""
    tuned = [method for method in study.methods if method in TUNED_VARIANTS]
    return [row for model in study.models for method in study.methods[2:]
            for other in ("maml", "basic", *(["melo"] if method != "melo" else []), *(tuned if is_melo(method) else []))
            for row in paired_rows(records, model, method, other, study.seeds)]


def is_melo(method):
    return method == "melo" or VARIANTS.get(method, (None, None))[1] == "melo"


def validation_cell(rmse):
    return "diverged" if rmse is None else f"{rmse:.4f}"


def tuned_table(study, records):
    """Which run each tuned variant chose per model and seed, and every run's validation RMSE."""
    chosen = [record for record in records if record["method"] in TUNED_VARIANTS]
    if not chosen:
        return ""
    runs = list(dict.fromkeys(run for record in chosen for run in record["validation_rmse_of_runs"]))
    header = ["Variant", "Model", "Seed", "Chosen", *(f"{TITLES[run]} validation RMSE" for run in runs)]
    rows = [[TITLES[record["method"]], TITLES[record["model"]], str(record["seed"]), TITLES[record["chosen_run"]],
             *(validation_cell(record["validation_rmse_of_runs"].get(run)) for run in runs)] for record in chosen]
    return (f"\n## Tuned on validation\n\nEach tuned variant is the run of the lowest validation RMSE "
            f"(its best checkpoint's) among its runs, per model and seed; the test users play no part. "
            f"A run that diverged is judged by its best checkpoint before that, and left out when it "
            f"diverged before its first validation.\n\n"
            f"{markdown_table(header, rows)}\n")


def interval_cell(row):
    return f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


def seeds_table(paired, what, label):
    """One row per model and pair of ``paired`` (paired_rows), one column per seed and the pooled
    one; ``what`` heads the column of the pairs, ``label(method, versus)`` names each."""
    seeds = list(dict.fromkeys(row["seed"] for row in paired))
    header = ["Model", what, *(f"seed {seed}" if seed != "pooled" else "pooled" for seed in seeds)]
    cells = {}
    for row in paired:
        cells.setdefault((row["model"], row["method"], row["versus"]), {})[row["seed"]] = interval_cell(row)
    rows = [[TITLES[model], label(method, other), *(found.get(seed, "") for seed in seeds)]
            for (model, method, other), found in cells.items()]
    return markdown_table(header, rows)


def paired_table(paired):
    """One row per model and difference, one column per seed and the pooled one."""
    if not paired:
        return ""
    table = seeds_table(paired, "Difference in RMSE [95 % interval]",
                        lambda method, other: f"{TITLES[method]} − {TITLES[other]}")
    return (f"\n## Paired differences\n\nA method's test RMSE minus another's on the same test "
            f"users, with a 95 % interval from a paired bootstrap over the users "
            f"({paired[0]['resamples']:,} resamples, seeded): negative when the first method's error is "
            f"lower; an interval that excludes 0 is a difference that the choice of test users does "
            f"not explain. Pooled: the seeds' test users together.\n\n{table}\n")


def seed_test_users(records, seed):
    """The test users of a seed's first run that has per-user errors (every method of a study's
    seed is tested on the same users), None when none has."""
    return next((r["metrics"]["per_user"]["user"] for r in records
                 if r["seed"] == seed and (r["metrics"] or {}).get("per_user")), None)


def study_difference(results_path, other_path):
    """Each method's test RMSE in one study minus the same method's in another on the same seeds'
    test users (a study at 3,000 iterations against the same at 300), per seed and pooled, as a
    markdown text, and its rows (paired_rows). Both studies' finished runs count, a seed's whole
    set or not (their waiting runs too): no difference here needs a seed's other methods."""
    (study, records, _), (other, other_records, _) = read_results(results_path), read_results(other_path)
    records, other_records = records + read_waiting_runs(results_path), other_records + read_waiting_runs(other_path)
    seeds = [seed for seed in study.seeds if seed in other.seeds]
    for seed in seeds:
        users, other_users = (seed_test_users(found, seed) for found in (records, other_records))
        if None not in (users, other_users) and users != other_users:
            raise UserError(f"{study.name} and {other.name} test other users on seed {seed}: only studies of the "
                            "same data file, filters, seeds and --num_test_data pair")
    rows = [row for model in study.models if model in other.models
            for method in study.methods if method in other.methods
            for row in paired_rows(records, model, method, method, seeds, other_records)]
    if not rows:
        raise UserError(f"{study.name} and {other.name} have no finished run of one model, method and seed in "
                        "common")
    table = seeds_table(rows, "Method", lambda method, _: TITLES[method])
    return (f"# {study.name} − {other.name}\n\nEach method's test RMSE in {study.name} "
            f"({study.num_train_iterations:,} iterations) minus the same method's in {other.name} "
            f"({other.num_train_iterations:,} iterations) on the same "
            f"test users, with its 95 % paired-bootstrap interval ({rows[0]['resamples']:,} resamples, seeded): "
            f"negative when {study.name}'s error is lower. Pooled: the seeds' test users together. Basic's "
            f"differences are 0 where the two studies made the same data and Basic.\n\n{table}\n"), rows


def reference_table(study, records, reference_records, paired):
    """Per model and seed (and pooled): MAML's and MELO's test RMSE in both codebases and
    their MELO − MAML intervals side by side, and whether ours lies inside the reference's."""
    header = ["Model", "Seed", "Reference MAML", "Reference MELO", "Reference MELO − MAML [95 %]",
              "Ours MAML", "Ours MELO", "Ours MELO − MAML [95 %]", "Ours inside the reference's interval"]
    rows, summary = [], []
    for model in study.models:
        theirs = {row["seed"]: row for row in paired_rows(reference_records, model, "melo", "maml", study.seeds)}
        ours = {row["seed"]: row for row in paired
                if (row["model"], row["method"], row["versus"]) == (model, "melo", "maml")}
        for seed in theirs:
            rmse = {(codebase, method): (statistics.fmean(metric_values(source, model, method, "rmse"))
                                         if seed == "pooled" else
                                         metric_values([r for r in source if r["seed"] == seed], model, method,
                                                       "rmse")[0])
                    for codebase, source in (("reference", [r for r in reference_records if r["seed"] in theirs]),
                                             ("ours", [r for r in records if r["seed"] in theirs]))
                    for method in REFERENCE_METHODS}
            mine = ours.get(seed)
            inside = "" if mine is None else ("yes" if theirs[seed]["low"] <= mine["difference"] <= theirs[seed]["high"]
                                              else "no")
            rows.append([TITLES[model], str(seed), *(f"{rmse['reference', m]:.4f}" for m in REFERENCE_METHODS),
                         interval_cell(theirs[seed]), *(f"{rmse['ours', m]:.4f}" for m in REFERENCE_METHODS),
                         "" if mine is None else interval_cell(mine), inside])
            summary.append({"model": model, "seed": seed, "reference": theirs[seed], "ours": mine,
                            "inside": inside == "yes"})
    if not rows:
        return "", summary
    return (f"\n## Side by side with the reference code\n\nThe reference implementation's MAML and MELO "
            f"(benchmarks/reference_study.py: its own code, seeded, same data file and test users), "
            f"test RMSE and MELO − MAML with its 95 % paired-bootstrap interval, beside this project's. "
            f"Pooled RMSE: the mean over the seeds.\n\n{markdown_table(header, rows)}\n"), summary


def read_reference_results(folder, study, records):
    """The reference's MAML and MELO records (benchmarks/reference_study.py's JSON files) for
    the study's models and seeds that have them, checked to be of this study's test users."""
    found = []
    for seed in study.seeds:
        for model in study.models:
            paths = [Path(folder) / f"{model}_{method}_seed{seed}.json" for method in REFERENCE_METHODS]
            if not all(path.is_file() for path in paths):
                continue
            ours = per_user_errors(records, model, "maml", seed)
            for path in paths:
                record = json.loads(path.read_text())
                if ours is not None and record["metrics"]["per_user"]["user"] != ours["user"]:
                    raise UserError(f"{path}: the reference was tested on other users than this study's "
                                    f"seed {seed} (run it with --seed {seed} on the same data file)")
                found.append(record)
    return found


def dataset_table(study, stats):
    header = ["Dataset", "#Users", "#Items", "#Ratings", "Avg. length", "Balance score"]
    row = [study.name, f"{stats['num_users']:,}", f"{stats['num_items']:,}",
           f"{stats['num_ratings']:,}", f"{stats['avg_seq_len']:.1f}", f"{stats['balance_score']:.3f}"]
    distribution = " | ".join(f"{rating:g}: {count:,} ({count / stats['num_ratings']:.1%})"
                              for rating, count in stats["rating_counts"].items())
    return (f"# Dataset: {study.name}\n\n"
            f"{markdown_table(header, [row])}\n\n"
            f"- file: `{stats['path']}` ({stats['layout']}, `--mode={study.mode}`)\n"
            f"- kept: items with at least {study.min_item} ratings, then users with at least "
            f"{study.min_sequence}\n"
            f"- average length: of the sequences cut at max_seq_len={stats['max_seq_len']} "
            f"({stats['avg_full_seq_len']:.1f} uncut)\n"
            f"- ratings: {distribution}\n"
            f"- balance score: normalised entropy of the rating histogram (1 = every rating "
            f"equally frequent)\n"
            f"- users per seed: {stats['num_train_users']:,} train, {stats['num_valid_users']:,} "
            f"valid, {stats['num_test_users']:,} test\n")


def study_tables(study, records, reference_records, waiting=()):
    """table.md's text, the paired differences and the reference's summary of a study's records;
    with no model's record yet, the list of the ``waiting`` runs (write_reports)."""
    if not any(record["model"] is not None for record in records):
        return (f"# {study.name}\n\nNo model has finished every run of a seed yet.\n{waiting_table(waiting)}",
                [], None)
    paired = paired_differences(records, study)
    side_by_side, reference_summary = reference_table(study, records, reference_records, paired)
    table = (results_table(study, records, paired) + paired_table(paired) + tuned_table(study, records)
             + side_by_side + waiting_table(waiting))
    return table, paired, reference_summary


def write_reports(study, study_dir, stats, records, reference_records, waiting=()):
    """results.json, table.md, dataset.md and the figures of a study; returns the table.
    ``waiting``: the records of finished runs whose seed's other runs of their model have not
    finished; results.json keeps them (a lost machine loses no finished run), the tables not."""
    records = [with_rounded_per_user(record) for record in records]
    waiting = [with_rounded_per_user(record) for record in waiting]
    table, paired, reference_summary = study_tables(study, records, reference_records, waiting)
    write_results(study_dir / "results.json", study, records, waiting, paired, reference_records, reference_summary)
    (study_dir / "table.md").write_text(table)
    (study_dir / "dataset.md").write_text(dataset_table(study, stats))
    write_figures(study, records, study_dir, waiting)
    return table


def waiting_table(waiting):
    """The finished runs whose seed has not finished its model's other runs, which the tables
    leave out: each one's test RMSE and step, and its paired difference from its seed's MAML
    where that has finished too."""
    runs = [record for record in waiting if record["model"] is not None]
    tested = [record for record in runs if record["metrics"]]
    rows = [[str(r["seed"]), TITLES[r["model"]], TITLES[r["method"]],
             f"{r['metrics']['rmse']:.4f}" if r["metrics"] else "diverged", str(r.get("checkpoint_step") or ""),
             "".join(map(interval_cell, paired_rows(tested, r["model"], r["method"], "maml", [r["seed"]])
                         if r["metrics"] and r["method"] != "maml" else []))] for r in runs]
    if not rows:
        return ""
    return ("\n## Finished runs waiting for the rest of their seed\n\nThe tables leave them out until every "
            "run of their model and seed has finished (results.json: waiting_runs). − MAML: paired over the "
            "seed's test users, 95 % interval.\n\n"
            + markdown_table(["Seed", "Model", "Method", "RMSE", "Step", "− MAML"], rows) + "\n")


def write_figures(study, records, folder, waiting=()):
    """per_rating.png of the whole sets, curves.png of every finished run that has a learning
    curve (the waiting runs' too); a figure with nothing to draw is removed (an earlier one)."""
    if any(record["model"] is not None for record in records):
        plot_per_rating(study, records, folder / "per_rating.png")
    else:
        (folder / "per_rating.png").unlink(missing_ok=True)
    if not plot_curves(study, [*records, *waiting], folder / "curves.png", multi_step_loss_end=MULTI_STEP_LOSS_END):
        (folder / "curves.png").unlink(missing_ok=True)


def render(results_path):
    """table.md and per_rating.png of a study again, from its results.json alone; returns the table."""
    study, records, reference_records = read_results(results_path)
    waiting = read_waiting_runs(results_path)
    table = study_tables(study, records, reference_records, waiting)[0]
    folder = Path(results_path).parent
    (folder / "table.md").write_text(table)
    write_figures(study, records, folder, waiting)
    return table


def forest_rows(results_paths):
    """Per committed study, model and method of FOREST_METHODS: its difference from MAML pooled
    over the seeds (paired_rows), the study's budget and a label; ordered by dataset, model,
    method and budget, so that a study at 300 and at 3,000 iterations stand together."""
    rows = []
    for path in results_paths:
        study, records, _ = read_results(path)
        for model in study.models:
            for method in (method for method in FOREST_METHODS if method in study.methods):
                found = paired_rows(records, model, method, "maml", study.seeds)
                if not found:
                    continue
                users = sum(len(per_user_errors(records, model, "maml", seed)["user"]) for seed in study.seeds
                            if per_user_errors(records, model, "maml", seed) is not None)
                rows.append({"study": study.name, "dataset": study.data_path, "model": model, "method": method,
                             "iterations": study.num_train_iterations, "users": users, **found[-1],
                             "label": f"{study.name} · {TITLES[model]} · {TITLES[method]} · "
                                      f"{study.num_train_iterations:,} it · {users:,} users"})
    rows.sort(key=lambda row: (row["dataset"], row["model"], row["method"], row["iterations"], row["study"]))
    # a study that reused another's runs (the controls reuse MAML and MELO) repeats its rows: once
    same = [(row["dataset"], row["model"], row["method"], row["iterations"], row["users"], round(row["difference"], 6))
            for row in rows]
    return [row for position, row in enumerate(rows) if same[position] not in same[:position]]


def committed_results():
    """The results.json of every committed study that reproduce.py wrote (one that records its command)."""
    return [path for path in sorted(PROJECT_DIR.glob("results/**/results.json"))
            if "command" in json.loads(path.read_text())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="results.json files that reproduce.py wrote")
    parser.add_argument("--forest", metavar="PNG", nargs="?", const=str(FOREST_PATH),
                        help="write the forest plot of the results.json files given (default: every committed "
                             "one) to PNG (default: %(const)s)")
    parser.add_argument("--minus", metavar="OTHER", help="print each method's test RMSE in the one results.json "
                        "given minus the same method's in OTHER (another results.json of the same seeds and test "
                        "users: the same study at another budget), per seed and pooled")
    arguments = parser.parse_args(argv)
    if arguments.minus:
        if len(arguments.results) != 1:
            raise UserError("--minus OTHER takes one results.json to subtract OTHER from: "
                            "python report.py STUDY/results.json --minus OTHER/results.json")
        text, rows = study_difference(arguments.results[0], arguments.minus)
        print(text)
        return rows
    if arguments.forest:
        rows = forest_rows(arguments.results or committed_results())
        plot_forest(rows, arguments.forest)
        print(f"{arguments.forest}: {len(rows)} differences")
        return rows
    for path in arguments.results:
        render(path)
        print(f"{Path(path).parent / 'table.md'} and its figures")


if __name__ == "__main__":
    run_cli(main)
