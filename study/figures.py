"""A study's figures: RMSE per true rating (per_rating.png), the learning curves
(curves.png), and the forest plot of every committed study's MELO − MAML (results/forest.png)."""
import statistics

import numpy as np
from matplotlib.figure import Figure

from study.learning_curves import effective_step
from study.study_options import TITLES

METHOD_COLOURS = {"basic": "tab:gray", "maml": "tab:blue", "melo": "tab:red", "melo_rating_blind": "tab:orange"}


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


# --- RMSE per true rating --------------------------------------------------------------------
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
    figure.suptitle(f"{study.name}: test RMSE per true rating\n"
                    f"({seeds_phrase(by_model, 'mean ± std over seeds')})")
    figure.savefig(path, dpi=120)


# --- learning curves -------------------------------------------------------------------------
def curve_series(records, model, method, values):
    """The steps that every seed's curve of ``model`` and ``method`` has, and per step the mean,
    lowest and highest over seeds of ``values(curve)``; None when no run has a curve."""
    curves = [r["curve"] for r in records if (r["model"], r["method"]) == (model, method) and r.get("curve")]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(curve["step"]) for curve in curves)))
    per_seed = [dict(zip(curve["step"], values(curve))) for curve in curves]
    table = np.array([[seed[step] for step in steps] for seed in per_seed])   # [seeds, steps]
    return np.array(steps), table.mean(axis=0), table.min(axis=0), table.max(axis=0)


def plot_curves(study, records, path, multi_step_loss_end=None):
    """Per model, the validation RMSE and the effective inner step (learning_curves) against the
    outer iteration, for each meta-learning method: the mean over seeds, a band from the lowest
    seed to the highest. A dotted line where the MAML++ multi-step loss ends. Returns whether
    any run had a curve (nothing is written otherwise)."""
    models = [model for model in seeds_by_model(study, records)
              if any(r.get("curve") for r in records if r["model"] == model)]
    if not models:
        return False
    figure = Figure(figsize=(11, 3.6 * len(models)), layout="constrained")
    axes = figure.subplots(len(models), 2, squeeze=False)
    for (rmse_axis, step_axis), model in zip(axes, models):
        seeds = {method: sum(1 for r in records if (r["model"], r["method"]) == (model, method) and r.get("curve"))
                 for method in study.methods}
        for method in study.methods:
            for axis, values in ((rmse_axis, lambda curve: curve["valid_rmse"]), (step_axis, effective_step)):
                series = curve_series(records, model, method, values)
                if series is None:
                    continue
                steps, mean, low, high = series
                colour = METHOD_COLOURS.get(method)
                fewer = f" ({seeds[method]} of {max(seeds.values())} seeds)" if seeds[method] < max(seeds.values()) else ""
                axis.plot(steps, mean, label=TITLES[method] + fewer, color=colour)
                axis.fill_between(steps, low, high, alpha=0.2, color=colour, linewidth=0)
        for axis in (rmse_axis, step_axis):
            axis.set_xlabel("outer iteration")
            if multi_step_loss_end and multi_step_loss_end < study.num_train_iterations:
                axis.axvline(multi_step_loss_end, color="black", linestyle=":", linewidth=1)
        rmse_axis.set_ylabel("validation RMSE (stars)")
        rmse_axis.set_title(f"{TITLES[model]}: validation RMSE")
        step_axis.set_yscale("log")
        step_axis.set_ylabel("effective inner step")
        step_axis.set_title(f"{TITLES[model]}: mean LSLR rate × mean encoder weight")
        rmse_axis.legend()
    by_model = seeds_by_model(study, [r for r in records if r.get("curve")])
    ended = " (dotted: the multi-step loss ends)" if multi_step_loss_end else ""
    figure.suptitle(f"{study.name}: learning curves, {seeds_phrase(by_model, 'mean and range over seeds')}"
                    f"{ended}")
    figure.savefig(path, dpi=110)
    return True


# --- the forest plot -------------------------------------------------------------------------
def plot_forest(rows, path):
    """One line per row of ``rows`` (report.forest_rows: a study, model and comparison at a budget):
    the pooled difference in test RMSE with its 95 % paired interval, 0 marked, a grey line between
    one dataset and model and the next."""
    figure = Figure(figsize=(10, 0.28 * len(rows) + 2.0), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(rows))[::-1]
    for position, row in zip(positions, rows):
        colour = "tab:red" if row["iterations"] >= 3000 else "tab:blue"
        marker = "o" if row["method"] == "melo" else "s"
        axis.errorbar(row["difference"], position, xerr=[[row["difference"] - row["low"]], [row["high"] - row["difference"]]],
                      fmt=marker, color=colour, markersize=4, capsize=2, linewidth=1)
    for position, row, above in zip(positions[1:], rows[1:], rows):    # a line between dataset-and-model groups
        if (row["dataset"], row["model"]) != (above["dataset"], above["model"]):
            axis.axhline(position + 0.5, color="lightgrey", linewidth=0.8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(positions, [row["label"] for row in rows], fontsize=7)
    axis.set_ylim(-0.8, len(rows) - 0.2)
    axis.set_xlabel("test RMSE − MAML's (stars), seeds pooled, 95 % paired interval")
    for colour, budget in (("tab:blue", "under 3,000 outer iterations"), ("tab:red", "3,000 (the paper's)")):
        axis.plot([], [], "o", color=colour, label=budget)
    axis.plot([], [], "o", color="black", label="MELO − MAML")
    axis.plot([], [], "s", color="black", label="rating-blind MELO − MAML")
    figure.legend(loc="outside lower center", ncols=4, fontsize=7)
    axis.set_title("MELO − MAML in every committed study (< 0: MELO better)")
    figure.savefig(path, dpi=120)
