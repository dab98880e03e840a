"""A study's reports: the paper's table with MELO's paired differences (table.md), the
reference code's runs beside ours, the data statistics (dataset.md), RMSE per true rating
(per_rating.png) and every record (results.json).

    python report.py results/quick/results.json    # table.md and per_rating.png again, from the JSON
"""
import argparse
import json
import shlex
import statistics
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from atomic_files import write_json
from evaluation import paired_rmse_difference
from experiment import UserError, run_cli
from study_options import TUNED_VARIANTS, VARIANTS, parse_command_line

METRICS = ("rmse", "mae")
TITLES = {"basic": "Basic", "maml": "MAML", "melo": "MELO", "mean_rating": "mean rating",
          **{name: title for name, (title, _, _) in VARIANTS.items()},
          "gru4rec": "GRU4Rec", "narm": "NARM", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
          "ncf": "NCF", "rmse": "RMSE", "mae": "MAE"}
REFERENCE_METHODS = ("maml", "melo")   # what benchmarks/reference_study.py writes


def metric_values(records, model, method, metric):
    """One value per seed."""
    return [r["metrics"][metric] for r in records if r["model"] == model and r["method"] == method]


def mean_cell(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def improvement(other, melo):
    """MELO's improvement over another method in %: positive when MELO's error is lower."""
    return (other - melo) / other * 100


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def model_row(records, model, methods):
    """A model's cells: each method's RMSE and MAE, then MELO's improvements on the means."""
    def mean(method, metric):
        return statistics.fmean(metric_values(records, model, method, metric))

    return [TITLES[model],
            *(mean_cell(metric_values(records, model, method, metric))
              for method in methods for metric in METRICS),
            *(f"{improvement(mean(other, metric), mean('melo', metric)):+.2f}"
              for other in ("basic", "maml") for metric in METRICS)]


def seeds_by_model(study, records):
    """The seeds of each model that ``records`` have, in the study's order: all of the study's,
    or with reproduce.py --report_finished those finished so far."""
    by_model = {model: [seed for seed in study.seeds
                        if any((r["model"], r["seed"]) == (model, seed) for r in records)] for model in study.models}
    return {model: seeds for model, seeds in by_model.items() if seeds}


def seeds_phrase(by_model, several):
    """Which seeds a table or figure is of: one phrase when every model has the same ones."""
    phrases = {model: f"{several} {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
               for model, seeds in by_model.items()}
    if len(set(phrases.values())) == 1:
        return next(iter(phrases.values()))
    return "; ".join(f"{TITLES[model]}: {phrase}" for model, phrase in phrases.items())


def results_table(study, records):
    header = ["Model",
              *(f"{TITLES[method]} {TITLES[metric]}" for method in study.methods for metric in METRICS),
              *(f"MELO vs {TITLES[other]} {TITLES[metric]} (%)" for other in ("basic", "maml")
                for metric in METRICS)]
    by_model = seeds_by_model(study, records)
    rows = [model_row(records, model, study.methods) for model in by_model]
    baseline = [mean_cell(metric_values(records, None, "mean_rating", metric)) for metric in METRICS]
    rows.append(["Mean rating", *baseline, *[""] * (len(header) - 3)])
    test_users = metric_values(records, None, "mean_rating", "num_users")[0]
    spread = seeds_phrase(by_model, "mean ± sample standard deviation over seeds")
    extra = f"; flags given to every run: `{shlex.join(study.run_flags)}`" if study.run_flags else ""
    return (f"# Results: {study.name}\n\n"
            f"Test RMSE and MAE in stars on the same {test_users} cold-start test users for every "
            f"method ({spread}). Basic: {study.pretrain_epochs} epochs; MAML and MELO: "
            f"{study.num_train_iterations} iterations from Basic's embedding{extra}.\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"MELO vs X = (X − MELO) / X × 100 on the means over seeds: positive when MELO's "
            f"error is lower. Mean rating: the training users' mean rating predicted for every "
            f"test target (no model); its RMSE and MAE are in the Basic columns.\n")


def per_user_errors(records, model, method, seed):
    """A run's per-user test errors, None when it has none (recorded before they were kept)."""
    record = next((r for r in records if (r["model"], r["method"], r["seed"]) == (model, method, seed)), None)
    return None if record is None else record["metrics"].get("per_user")


def paired_rows(records, model, method, other, seeds):
    """``method``'s test RMSE minus ``other``'s on the same users, with its 95 % paired-bootstrap
    interval: per seed, and pooled over the seeds (their users together) when there are several."""
    rows, pooled, pooled_other = [], [], []
    for seed in seeds:
        errors, other_errors = (per_user_errors(records, model, m, seed) for m in (method, other))
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
    """Each method after MAML against MAML and against Basic, and MELO and its variants against
    each tuned variant of MAML, per model (see paired_rows)."""
    tuned = [method for method in study.methods if method in TUNED_VARIANTS]
    return [row for model in study.models for method in study.methods[2:]
            for other in ("maml", "basic", *(tuned if is_melo(method) else []))
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


def paired_table(paired):
    if not paired:
        return ""
    columns = list(dict.fromkeys((row["method"], row["versus"]) for row in paired))
    header = ["Model", "Seed", *(f"{TITLES[method]} − {TITLES[other]} RMSE [95 % interval]"
                                 for method, other in columns)]
    cells = {}
    for row in paired:
        cells.setdefault((row["model"], row["seed"]), {})[row["method"], row["versus"]] = interval_cell(row)
    rows = [[TITLES[model], str(seed), *(found.get(column, "") for column in columns)]
            for (model, seed), found in cells.items()]
    return (f"\n## Paired differences\n\nMELO's test RMSE minus the other method's on the same test "
            f"users, with a 95 % interval from a paired bootstrap over the users "
            f"({paired[0]['resamples']:,} resamples, seeded): negative when MELO's error is lower; "
            f"an interval that excludes 0 is a difference that the choice of test users does not "
            f"explain. Pooled: the seeds' test users together.\n\n{markdown_table(header, rows)}\n")


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


def per_rating_rmse(reports, rating):
    """Mean and standard deviation over seeds of the RMSE at one true rating (nan when absent)."""
    values = [report[rating]["rmse"] for report in reports
              if rating in report and report[rating]["rmse"] is not None]
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_rating_panels(study, records):
    """Per model: its per-rating reports by method (one per seed), the true ratings that
    test targets have, in order, and their target counts summed over seeds."""
    panels = []
    for model in seeds_by_model(study, records):
        reports = {method: [r["metrics"]["per_rating"] for r in records
                            if r["model"] == model and r["method"] == method] for method in study.methods}
        counts = {}
        for report in reports["basic"]:
            for rating, entry in report.items():
                counts[rating] = counts.get(rating, 0) + entry["count"]
        ratings = sorted((rating for rating, count in counts.items() if count), key=float)
        panels.append((model, reports, ratings, counts))
    return panels


def plot_per_rating(study, records, path):
    """Grouped bars of the RMSE per true rating, Basic / MAML / MELO, one panel per model;
    the tick labels give the number of test targets with that rating (all seeds)."""
    panels = per_rating_panels(study, records)
    by_model = seeds_by_model(study, records)
    most_ratings = max(len(ratings) for _, _, ratings, _ in panels)
    panel_inches = max(4.8, 0.6 * most_ratings + 1.0)  # half stars need wider panels
    figure = Figure(figsize=(max(6.0, panel_inches * len(panels)), 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)
    width = 0.8 / len(study.methods)
    for axis, (model, reports, ratings, counts) in zip(axes[0], panels):
        positions = np.arange(len(ratings))
        for offset, method in enumerate(study.methods):
            means, stds = zip(*(per_rating_rmse(reports[method], rating) for rating in ratings))
            axis.bar(positions + (offset - (len(study.methods) - 1) / 2) * width, means, width,
                     label=TITLES[method],
                     yerr=stds if len(by_model[model]) > 1 else None, capsize=2)
        axis.set_xticks(positions, [f"{rating}\nn={counts[rating]}" for rating in ratings])
        axis.set_title(TITLES[model])
        axis.set_xlabel("true rating")
    axes[0][0].set_ylabel("RMSE (stars)")
    axes[0][0].legend()
    figure.suptitle(f"{study.name}: test RMSE per true rating\n({seeds_phrase(by_model, 'mean ± std over seeds')})")
    figure.savefig(path, dpi=120)


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


def study_tables(study, records, reference_records):
    """table.md's text, the paired differences and the reference's summary of a study's records."""
    paired = paired_differences(records, study)
    side_by_side, reference_summary = reference_table(study, records, reference_records, paired)
    table = results_table(study, records) + paired_table(paired) + tuned_table(study, records) + side_by_side
    return table, paired, reference_summary


def write_reports(study, study_dir, stats, records, reference_records):
    """results.json, table.md, dataset.md and per_rating.png of a study; returns the table."""
    records = [with_rounded_per_user(record) for record in records]
    table, paired, reference_summary = study_tables(study, records, reference_records)
    # results.json, kept small: one line, the per-user errors only of the methods in the tables
    # (a tuned variant's other runs keep theirs in their own records), each seed's users once
    runs, test_users = with_users_once_per_seed(
        [record if record["method"] in study.methods or record["model"] is None else
         {**record, "metrics": without_per_user(record["metrics"])} for record in records])
    write_json(study_dir / "results.json",
               {"dataset": study.name, "command": study.command, "study": study.study_files,
                "data_path": study.data_path, "mode": study.mode, "seeds": study.seeds, "models": study.models,
                "methods": study.methods, "run_flags": study.run_flags, "test_users": test_users,
                "runs": runs, "paired": paired,
                "reference_runs": reference_records, "reference_paired": reference_summary}, indent=None)
    (study_dir / "table.md").write_text(table)
    (study_dir / "dataset.md").write_text(dataset_table(study, stats))
    plot_per_rating(study, records, study_dir / "per_rating.png")
    return table


def read_results(results_path):
    """The study that a results.json records (its settings from the command it records), its
    runs with their test-user ids again, and the reference's runs."""
    recorded = json.loads(Path(results_path).read_text())
    study = parse_command_line(shlex.split(recorded["command"])[2:])
    return study, with_test_users(recorded["runs"], recorded.get("test_users", {})), recorded["reference_runs"]


def runs_own_records(records):
    """The records of the runs themselves among a results.json's: without the tuned variants'
    copies (tuned_records makes them again), and each run that a tuned variant chose with the
    per-user errors that its copy kept."""
    chosen = {(record["seed"], record["model"], record["chosen_run"]): record["metrics"]
              for record in records if "chosen_run" in record}
    return [{**record, "metrics": chosen.get((record["seed"], record["model"], record["method"]), record["metrics"])}
            for record in records if "chosen_run" not in record]


def render(results_path):
    """table.md and per_rating.png of a study again, from its results.json alone; returns the table."""
    study, records, reference_records = read_results(results_path)
    table = study_tables(study, records, reference_records)[0]
    folder = Path(results_path).parent
    (folder / "table.md").write_text(table)
    plot_per_rating(study, records, folder / "per_rating.png")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files that reproduce.py wrote")
    for path in parser.parse_args(argv).results:
        render(path)
        print(f"{Path(path).parent / 'table.md'}, {Path(path).parent / 'per_rating.png'}")


if __name__ == "__main__":
    run_cli(main)
