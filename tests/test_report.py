"""report.py and study/figures.py on the tiny study (tiny_study.py) and on the committed results: the
table, the paired differences, the curves, the reference beside ours, the figures, the forest
plot, and every committed table rendering again from its results.json."""
import json
import shlex
import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from config import DataConfig
from dataloader import load_data
from options import parse_args
import report
from run.errors import UserError
from study import figures, learning_curves, results_json, study_options
from study.records import with_checksum
from tiny_study import (DATA, RUN_FLAGS, SEEDS, METHODS, table_rows, by_seed, mean_and_std, metric, method_rows,
                        paired_cells, metric_field, reference_records, write_reference, settings)

RESULTS = study_options.PROJECT_DIR / "results"
NOT_FROM_REPRODUCE = {"ml-100k/bert4rec-reference-embedding"}   # benchmarks/reference_embedding.py, then main.py


def test_table_holds_a_row_per_method_with_its_mean_std_pooled_differences_and_best_steps(study):
    rows = method_rows((study.dir / "table.md").read_text())
    titles = {"basic": "Basic", "maml": "MAML", "melo": "MELO", "melo_normalized": "MELO (normalised)"}
    assert list(rows) == [*(("GRU4Rec", titles[method]) for method in METHODS), ("", "Mean rating")]
    paired = json.loads((study.dir / "results.json").read_text())["paired"]
    pooled = {(row["method"], row["versus"]): row for row in paired if row["seed"] == "pooled"}
    for method in METHODS:
        row = rows["GRU4Rec", titles[method]]
        for name, column in (("rmse", "RMSE"), ("mae", "MAE")):
            values = metric(study, "gru4rec", method, name)
            assert len(values) == 2
            mean, std = mean_and_std(row[column])
            assert mean == pytest.approx(statistics.fmean(values), abs=6e-5)
            assert std == pytest.approx(statistics.stdev(values), abs=6e-5)
        for other, column in (("maml", "− MAML RMSE [95 %]"), ("melo", "− MELO RMSE [95 %]")):
            found = pooled.get((method, other))
            assert row[column] == ("" if found is None else
                                   f"{found['difference']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]")
        assert row["Best step"] == ", ".join(str(step) for step in metric_field(study, method, "checkpoint_step"))
    assert rows["GRU4Rec", "MELO"]["− MAML RMSE [95 %]"] and rows["GRU4Rec", "MELO (normalised)"]["− MELO RMSE [95 %]"]
    baseline = rows["", "Mean rating"]
    for name, column in (("rmse", "RMSE"), ("mae", "MAE")):
        mean, std = mean_and_std(baseline[column])
        values = metric(study, None, "mean_rating", name)
        assert mean == pytest.approx(statistics.fmean(values), abs=6e-5)
        assert std == pytest.approx(statistics.stdev(values), abs=6e-5)


def test_paired_differences_per_seed_and_pooled(study):
    paired = json.loads((study.dir / "results.json").read_text())["paired"]
    assert [(row["method"], row["versus"], row["seed"]) for row in paired] == [
        (method, other, seed) for method, others in (("melo", ("maml", "basic")),
                                                     ("melo_normalized", ("maml", "basic", "melo")))
        for other in others for seed in (*SEEDS, "pooled")]
    for row in paired:
        assert row["low"] <= row["difference"] <= row["high"] and row["resamples"] == 1000
        if row["seed"] != "pooled":
            melo, other = (metric(study, "gru4rec", method, "rmse")[SEEDS.index(row["seed"])]
                           for method in (row["method"], row["versus"]))
            # from the per-user errors that results.json keeps, to 7 significant digits
            assert row["difference"] == pytest.approx(melo - other, rel=0, abs=1e-6)
    cells = paired_cells((study.dir / "table.md").read_text())
    assert list(next(iter(cells.values()))) == ["Model", "Difference in RMSE [95 % interval]",
                                                *(f"seed {seed}" for seed in SEEDS), "pooled"]
    for row in paired:
        title = {"melo": "MELO", "melo_normalized": "MELO (normalised)", "maml": "MAML", "basic": "Basic"}
        shown = cells["GRU4Rec", f"{title[row['method']]} − {title[row['versus']]}"][
            "pooled" if row["seed"] == "pooled" else f"seed {row['seed']}"]
        assert shown == f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


def test_each_meta_learning_run_records_its_learning_curve_and_the_figure_draws_it(study):
    for record in study.records:
        curve = record["curve"]
        if record["method"] in ("mean_rating", "basic"):
            assert curve is None
            continue
        assert curve["step"] == [1, 2]            # --log_interval=1, 2 iterations
        assert len(curve["valid_rmse"]) == len(curve["inner_lr"]) == 2
        assert min(curve["valid_rmse"]) == pytest.approx(record["validation_rmse"], rel=1e-4)
        assert (curve["encoder_weight"] is None) == (record["method"] == "maml")
        steps = learning_curves.effective_step(curve)
        factor = [1.0, 1.0] if curve["encoder_weight"] is None else curve["encoder_weight"]
        assert steps == pytest.approx([rate * weight for rate, weight in zip(curve["inner_lr"], factor)])
    assert (study.dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_best_validation_of_a_curve_is_the_step_tested(study):
    for record in study.records:
        if record["curve"] is not None:
            curve = record["curve"]
            best = curve["step"][curve["valid_rmse"].index(min(curve["valid_rmse"]))]
            assert record["checkpoint_step"] == best


def test_the_reference_runs_are_set_beside_ours_on_the_same_users(study, tmp_path):
    options = study_options.parse_command_line(study.argv)
    paired = report.paired_differences(study.records, options)
    ours = {row["seed"]: row for row in paired if (row["method"], row["versus"]) == ("melo", "maml")}
    write_reference(tmp_path / "reference", reference_records(study, 0.64))   # MELO's RMSE 0.8 × MAML's
    found = report.read_reference_results(tmp_path / "reference", options, study.records)
    assert len(found) == 4
    section, summary = report.reference_table(
        options, study.records, found, paired)
    rows = by_seed(section)
    assert [entry["seed"] for entry in summary] == [*SEEDS, "pooled"]
    for entry in summary:
        seed = entry["seed"]
        row = rows[str(seed)]
        maml = statistics.fmean(r["metrics"]["rmse"] for r in found
                                if r["method"] == "maml" and seed in (r["seed"], "pooled"))
        assert float(row["Reference MAML"]) == pytest.approx(maml, abs=6e-5)
        if seed != "pooled":
            assert entry["reference"]["difference"] == pytest.approx(-0.2 * maml)
        assert entry["reference"]["high"] < 0          # every resample's MELO is 0.8 × its MAML
        assert entry["ours"] == ours[seed]
        inside = entry["reference"]["low"] <= ours[seed]["difference"] <= entry["reference"]["high"]
        assert entry["inside"] == inside and row["Ours inside the reference's interval"] == ("yes" if inside else "no")


def test_the_same_reference_results_are_inside_their_own_interval(study, tmp_path):
    """The reference's MELO − MAML set beside itself: every difference lies inside."""
    options = study_options.parse_command_line(study.argv)
    records = [r for r in study.records if r["method"] not in ("melo", "maml")]
    records += [{**r, "codebase": None} for r in reference_records(study, 0.81)]
    write_reference(tmp_path / "reference", reference_records(study, 0.81))
    found = report.read_reference_results(tmp_path / "reference", options, records)
    paired = report.paired_differences(records, options)
    _, summary = report.reference_table(options, records, found, paired)
    assert [entry["inside"] for entry in summary] == [True, True, True]


def test_reference_results_of_other_users_are_refused(study, tmp_path):
    options = study_options.parse_command_line(study.argv)
    records = reference_records(study, 0.9)
    for record in records:
        record["metrics"]["per_user"]["user"] = list(reversed(record["metrics"]["per_user"]["user"]))
    write_reference(tmp_path / "reference", records)
    with pytest.raises(UserError, match="tested on other users than this study's seed 222"):
        report.read_reference_results(tmp_path / "reference", options, study.records)


def test_a_study_minus_another_pairs_each_method_on_the_same_users_and_refuses_other_users(study, tmp_path):
    recorded = json.loads((study.dir / "results.json").read_text())
    for record in recorded["runs"]:              # the same study with MELO's error 10 % larger on every user
        if record["method"] == "melo":
            per_user = record["metrics"]["per_user"]
            per_user["squared_error"] = [1.21 * error for error in per_user["squared_error"]]
            record["metrics"]["rmse"] *= 1.1
    other = tmp_path / "results.json"
    other.write_text(json.dumps(with_checksum(recorded)))
    rows = report.main([str(study.dir / "results.json"), "--minus", str(other)])
    found = {(row["method"], row["seed"]): row for row in rows}
    assert set(found) == {(method, seed) for method in METHODS for seed in (*SEEDS, "pooled")}
    for seed, rmse in zip(SEEDS, metric(study, "gru4rec", "melo", "rmse")):
        assert found["melo", seed]["difference"] == pytest.approx(-0.1 * rmse, abs=1e-6)
        assert found["melo", seed]["low"] <= found["melo", seed]["difference"] <= found["melo", seed]["high"] < 0
    for method in set(METHODS) - {"melo"}:
        assert all(found[method, seed][name] == 0 for seed in (*SEEDS, "pooled") for name in ("difference", "low", "high"))
    with pytest.raises(UserError, match="takes one results.json"):
        report.main([str(study.dir / "results.json"), str(other), "--minus", str(other)])
    recorded["test_users"][str(SEEDS[1])].reverse()
    other.write_text(json.dumps(with_checksum(recorded)))
    with pytest.raises(UserError, match=f"test other users on seed {SEEDS[1]}"):
        report.main([str(study.dir / "results.json"), "--minus", str(other)])


def test_dataset_table_equals_the_statistics_of_load_data(study):
    stats = load_data(DataConfig.from_args(parse_args([f"--data_path={study.ratings}", *DATA, *RUN_FLAGS]))).stats
    row = table_rows((study.dir / "dataset.md").read_text())["tiny"]
    assert int(row["#Users"].replace(",", "")) == stats["num_users"] == 60
    assert int(row["#Items"].replace(",", "")) == stats["num_items"]
    assert int(row["#Ratings"].replace(",", "")) == stats["num_ratings"]
    assert float(row["Avg. length"]) == round(stats["avg_seq_len"], 1)
    assert float(row["Balance score"]) == round(stats["balance_score"], 3)


def test_per_rating_figure_is_a_png(study):
    figure = (study.dir / "per_rating.png").read_bytes()
    assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 10_000


def test_per_rating_panels_sum_counts_over_seeds_and_leave_out_absent_ratings():
    def record(seed, method, per_rating):
        return {"seed": seed, "model": "narm", "method": method,
                "metrics": {"per_rating": {rating: {"count": count, "rmse": None if not count else 1.0}
                                           for rating, count in per_rating.items()}}}

    records = [record(seed, method, {"0.5": 0, "1": 2, "4.5": seed, "10": 0})
               for seed in (1, 2) for method in ("basic", "maml", "melo")]
    options = SimpleNamespace(name="x", models=["narm"], seeds=[1, 2], methods=["basic", "maml", "melo"])
    [(model, reports, ratings, counts)] = figures.per_rating_panels(options, records)
    assert model == "narm" and len(reports["melo"]) == 2
    assert ratings == ["1", "4.5"]                       # in numeric order, only ratings with targets
    assert (counts["1"], counts["4.5"]) == (4, 3)


def test_a_table_of_models_with_other_seeds_says_which_seeds_each_has():
    phrase = figures.seeds_phrase({"gru4rec": [222, 223], "bert4rec": [222]}, "mean ± std over seeds")
    assert phrase == "GRU4Rec: mean ± std over seeds 222, 223; BERT4Rec: seed 222"
    assert figures.seeds_phrase({"gru4rec": [222, 223], "narm": [222, 223]}, "over seeds") == "over seeds 222, 223"


def test_results_json_keeps_each_users_squared_errors_to_seven_significant_digits_and_each_seeds_users_once(study):
    results = json.loads((study.dir / "results.json").read_text())
    written = {(r["seed"], r["model"], r["method"]): r for r in results["runs"]}
    for record in study.records:
        per_user = written[record["seed"], record["model"], record["method"]]["metrics"]["per_user"]
        full = record["metrics"]["per_user"]
        assert set(per_user) == {"squared_error"} and results["test_users"][str(record["seed"])] == full["user"]
        squared = full["squared_error"]
        assert per_user["squared_error"] == [float(f"{error:.7g}") for error in squared]
        assert np.allclose(per_user["squared_error"], squared, rtol=5e-7, atol=0)
    # the tables are computed from what results.json keeps: rendered again, to the last digit
    assert report.render(study.dir / "results.json") == (study.dir / "table.md").read_text()
    # a run tested on other users keeps its own (the tables then refuse to pair it)
    records = [results_json.with_rounded_per_user(record) for record in study.records]
    records[-1]["metrics"]["per_user"]["user"] = list(reversed(records[-1]["metrics"]["per_user"]["user"]))
    runs, test_users = results_json.with_users_once_per_seed(records)
    assert runs[-1] == records[-1] and "user" not in runs[-2]["metrics"]["per_user"]
    assert results_json.with_test_users(runs, test_users) == records


@pytest.mark.parametrize("results", sorted(RESULTS.rglob("results.json")),
                         ids=lambda path: str(path.parent.relative_to(RESULTS)))
def test_each_committed_study_names_a_study_file_that_gives_its_command(results):
    recorded = json.loads(results.read_text())
    if str(results.parent.relative_to(RESULTS)) in NOT_FROM_REPRODUCE:
        assert "command" not in recorded
        return
    assert recorded["study"], "results.json names no study file"
    from_file = study_options.parse_command_line([f"@{study_options.PROJECT_DIR / name}" for name in recorded["study"]])
    typed = study_options.parse_command_line(shlex.split(recorded["command"])[2:])
    # a study that spans sessions commits the table of the seeds and models it has finished
    assert set(typed.seeds) <= set(from_file.seeds) and set(typed.models) <= set(from_file.models)
    assert settings(from_file) == dict(settings(typed), seeds=from_file.seeds, models=from_file.models)
    assert (from_file.name, from_file.methods) == (recorded["dataset"], recorded["methods"])
    assert (typed.seeds, typed.models) == (recorded["seeds"], recorded["models"])


@pytest.mark.parametrize("results", [path for path in sorted(RESULTS.rglob("results.json"))
                                     if str(path.parent.relative_to(RESULTS)) not in NOT_FROM_REPRODUCE],
                         ids=lambda path: str(path.parent.relative_to(RESULTS)))
def test_each_committed_table_renders_again_from_its_results_json(results, tmp_path):
    copy = tmp_path / "results.json"
    copy.write_text(results.read_text())
    assert report.render(copy) == (results.parent / "table.md").read_text()
    assert (tmp_path / "table.md").read_text() == (results.parent / "table.md").read_text()
    if any(record["model"] for record in json.loads(results.read_text())["runs"]):
        assert (tmp_path / "per_rating.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:                                                     # a study none of whose sets has finished
        assert not (tmp_path / "per_rating.png").exists() and "waiting_runs" in (tmp_path / "table.md").read_text()


def test_the_forest_plot_draws_every_committed_studys_pooled_difference_from_maml(tmp_path):
    rows = report.main(["--forest", str(tmp_path / "forest.png")])
    assert (tmp_path / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = {(row["study"], row["model"], row["method"]): row for row in rows}
    controls = found["ml-100k-controls", "gru4rec", "melo"]     # its table.md: -0.0099 [-0.0303, +0.0101]
    assert [round(controls[name], 4) for name in ("difference", "low", "high")] == [-0.0099, -0.0303, 0.0101]
    assert (controls["iterations"], controls["users"]) == (300, 900)
    blind = found["ml-100k-controls", "bert4rec", "melo_rating_blind"]
    assert [round(blind[name], 4) for name in ("difference", "low", "high")] == [-0.0142, -0.0372, 0.0082]
    # the controls reused amazon-magazine's MAML and MELO: their difference is drawn once
    assert ("amazon-magazine", "gru4rec", "melo") in found
    assert ("amazon-magazine-controls", "gru4rec", "melo") not in found
    assert ("amazon-magazine-controls", "gru4rec", "melo_rating_blind") in found
    assert all(row["low"] <= row["difference"] <= row["high"] for row in rows)


