"""reproduce.py: one command from a rating file to the results table, on tiny runs.

One study (GRU4Rec, seeds 222 and 223, MELO also with normalised weights: 10 runs, 18 script
calls) is run once for the module; the tests read what it wrote and invoke it again to check reuse, resuming and
failures.
"""
import json
import os
import shlex
import shutil
import statistics
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import figures
import learning_curves
import records
import report
import reproduce
import study_plan
import study_options
from config import DataConfig
from dataloader import load_data
from experiment import UserError, run_cli
from fixtures import write_ratings
from options import parse_args

DATA = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8"]
BUDGET = ["--pretrain_epochs=1", "--num_train_iterations=2", "--log_interval=1"]
RUN_FLAGS = ["--num_samples=4", "--num_query_set=2", "--batch_size=4", "--pretraining_batch_size=16",
             "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8", "--gru4rec_n_layers=1",
             "--lstm_hidden=8", "--lstm_input_size=4"]
SEEDS = (222, 223)
METHODS = ("basic", "maml", "melo", "melo_normalized")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
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


# --- what one invocation writes ---------------------------------------------------------
def test_every_run_is_recorded_with_the_metrics_its_test_wrote(study):
    results = json.loads((study.dir / "results.json").read_text())
    assert report.with_test_users(results["runs"], results["test_users"]) == [
        report.with_rounded_per_user(record) for record in study.records]
    assert [(r["seed"], r["model"], r["method"]) for r in study.records] == [
        (seed, model, method) for seed in SEEDS
        for model, method in [(None, "mean_rating"), *(("gru4rec", m) for m in METHODS)]]
    for record in study.records:
        folder = study.dir / "runs" / str(record["seed"]) / (record["model"] or "")
        written = json.loads((folder / f"{record['method']}.json").read_text())
        assert written.pop("sha256") == records.digest(record) and written == record
        written = list((folder / record["method"]).rglob("*_test.json"))
        assert len(written) == 1
        tested = json.loads(written[0].read_text())
        assert tested["metrics"] == record["metrics"]
        assert record["checkpoint_step"] == tested.get("checkpoint_step")
        assert (record["checkpoint_step"] is None) == (record["method"] == "mean_rating")
        assert record["encoder_weight_per_rating"] == tested.get("encoder_weight_per_rating")
        assert (record["encoder_weight_per_rating"] is None) == (not record["method"].startswith("melo"))
        assert record["validation_rmse"] == tested.get("validation_rmse")
        assert (record["validation_rmse"] is None) == (record["method"] in ("mean_rating", "basic"))
        if record["checkpoint_step"] is not None:
            assert f"_{record['checkpoint_step']}_" in written[0].name   # the checkpoint tested
        assert set(record["metrics"]["per_rating"]) == {"1", "2", "3", "4", "5"}
        assert (folder / f"{record['method']}.log").is_file()


def test_each_method_runs_the_right_commands(study):
    commands = {(r["seed"], r["method"]): r["commands"] for r in study.records}
    for seed in SEEDS:
        folder = study.dir / "runs" / str(seed) / "gru4rec"
        basic_train, basic_test = commands[seed, "basic"]
        assert basic_train.startswith("python train_original.py ") and "--save_pretrained=True" in basic_train
        assert basic_test == basic_train + " --test"
        for method in ("maml", "melo", "melo_normalized"):
            train, test = commands[seed, method]
            assert train.startswith("python main.py ") and test == train + " --test"
            assert "--load_pretrained_embedding=True" in train
            assert f"--pretrain_log_dir={folder / 'basic'}" in train
            assert f"--log_dir={folder / method}" in train
            assert ("--use_adaptive_loss=False" in train) == (method == "maml")
            assert ("--normalize_weights=True" in train) == (method == "melo_normalized")
        assert commands[seed, "mean_rating"][0].endswith("--test_baseline")
        for method in (*METHODS, "mean_rating"):
            for command in commands[seed, method]:
                assert f"--random_seed={seed}" in command
                assert " ".join(RUN_FLAGS) in command


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


def metric_field(study, method, field):
    return [r[field] for r in study.records if (r["model"], r["method"]) == ("gru4rec", method)]


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


def test_a_record_written_without_its_curve_gets_it_from_the_runs_events(study):
    run = next(run for run in reproduce.plan_runs(study_options.parse_command_line(study.argv), study.dir / "runs")
               if run.method == "melo")
    written = json.loads(run.record_path.read_text())
    assert reproduce.finished_record(run) == {name: value for name, value in written.items() if name != "sha256"}
    older = {name: value for name, value in written.items() if name not in ("curve", "sha256")}
    run.record_path.write_text(json.dumps(older))
    try:
        assert reproduce.finished_record(run)["curve"] == written["curve"]
    finally:
        run.record_path.write_text(json.dumps(written))


def test_the_best_validation_of_a_curve_is_the_step_tested(study):
    for record in study.records:
        if record["curve"] is not None:
            curve = record["curve"]
            best = curve["step"][curve["valid_rmse"].index(min(curve["valid_rmse"]))]
            assert record["checkpoint_step"] == best


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


# --- invoking it again ----------------------------------------------------------------------
def test_a_second_invocation_reuses_every_run(study, capsys):
    before = file_times(study.dir / "runs")
    table = (study.dir / "table.md").read_text()
    capsys.readouterr()
    assert reproduce.main(study.argv) == study.records
    output = capsys.readouterr().out
    assert output.count("done before") == 10
    assert (study.dir / "table.md").read_text() in output      # the table is printed too
    assert ": training" not in output and ": testing" not in output
    assert file_times(study.dir / "runs") == before
    assert (study.dir / "table.md").read_text() == table


def test_a_study_without_its_runs_folder_goes_on_from_its_results_json(study, tmp_path, capsys):
    (tmp_path / "tiny").mkdir()
    shutil.copy(study.dir / "results.json", tmp_path / "tiny")     # a fresh clone: no runs folder
    split = study.argv.index("--")
    argv = [*study.argv[:split], f"--results_dir={tmp_path}", "--from_results", *study.argv[split:]]
    capsys.readouterr()
    with pytest.raises(UserError, match="nothing to report"):      # without --from_results: nothing restored
        reproduce.main([*study.argv[:split], f"--results_dir={tmp_path}", "--report_finished", *study.argv[split:]])
    reproduce.main(argv)
    output = capsys.readouterr().out
    assert "10 finished runs restored from" in output and output.count("done before") == 10
    assert ": training" not in output and ": testing" not in output
    assert (tmp_path / "tiny" / "table.md").read_text() == (study.dir / "table.md").read_text()
    restored, original = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "tiny", study.dir))
    # the command names its --results_dir, so the checksum differs too
    assert {**restored, "command": None, "sha256": None} == {**original, "command": None, "sha256": None}
    assert restored["sha256"] == records.digest(restored)
    shutil.rmtree(tmp_path / "tiny" / "runs")          # a results.json of other flags restores nothing
    changed = [flag.replace("--pretrain_epochs=1", "--pretrain_epochs=2") for flag in argv]
    with pytest.raises(UserError, match="nothing to report"):
        reproduce.main([*changed[:split], "--report_finished", *changed[split:]])
    assert not reproduce.finished_records(tmp_path / "tiny" / "runs")


def test_report_finished_reports_the_whole_model_seed_sets_and_runs_nothing(study, tmp_path, capsys):
    shutil.copytree(study.dir, tmp_path / "tiny")
    (tmp_path / "tiny" / "runs" / str(SEEDS[1]) / "gru4rec" / "melo.json").unlink()   # seed 223 under way
    before = file_times(tmp_path / "tiny" / "runs")
    split = study.argv.index("--")
    argv = [*study.argv[:split], "--report_finished", f"--results_dir={tmp_path}", *study.argv[split:]]
    records = reproduce.main(argv)
    assert ": training" not in capsys.readouterr().out and file_times(tmp_path / "tiny" / "runs") == before
    assert sorted((r["seed"], r["method"]) for r in records) == sorted(
        (SEEDS[0], method) for method in ("mean_rating", *METHODS))
    table = (tmp_path / "tiny" / "table.md").read_text()
    assert f"for every method (seed {SEEDS[0]})" in table
    for method, title in (("maml", "MAML"), ("melo", "MELO")):
        assert method_rows(table)["GRU4Rec", title]["RMSE"] == f"{metric(study, 'gru4rec', method, 'rmse')[0]:.4f}"
    assert report.render(tmp_path / "tiny" / "results.json") == table
    for seed in SEEDS:
        (tmp_path / "tiny" / "runs" / str(seed) / "gru4rec" / "basic.json").unlink()
    with pytest.raises(UserError, match="no model has finished all its runs of a seed yet"):
        reproduce.main(argv)
    with pytest.raises(UserError, match="nothing to report"):   # a study not started: nothing is written
        reproduce.main([flag.replace("--name=tiny", "--name=not_started") for flag in argv])
    assert not (tmp_path / "not_started").exists()


def test_a_table_of_models_with_other_seeds_says_which_seeds_each_has():
    phrase = figures.seeds_phrase({"gru4rec": [222, 223], "bert4rec": [222]}, "mean ± std over seeds")
    assert phrase == "GRU4Rec: mean ± std over seeds 222, 223; BERT4Rec: seed 222"
    assert figures.seeds_phrase({"gru4rec": [222, 223], "narm": [222, 223]}, "over seeds") == "over seeds 222, 223"


def test_other_flags_for_the_same_study_are_refused(study):
    changed = [flag.replace("--pretrain_epochs=1", "--pretrain_epochs=2") for flag in study.argv]
    with pytest.raises(UserError, match="other flags .*--pretrain_epochs=1 --pretrain_epochs=2"):
        reproduce.main(changed)


@pytest.mark.parametrize("flag, named", [("--model=narm", "--model"),
                                         ("--checkpoint=1", "--checkpoint_step"),
                                         ("--num_test=4", "--num_test_data")])
def test_flags_that_reproduce_sets_are_refused_after_the_separator(study, flag, named):
    with pytest.raises(UserError, match=f"{named} after `--`"):
        reproduce.main([*study.argv, flag])


def test_an_unknown_flag_for_the_runs_is_refused_before_any_run(study):
    with pytest.raises(UserError, match="flags for the runs: unrecognized arguments: --no_such_flag"):
        reproduce.main([*study.argv, "--no_such_flag=1"])


def test_a_failed_run_stops_the_study_with_the_end_of_its_log(study, capsys):
    seed_dir = study.dir / "runs" / "224"
    seed_dir.mkdir()
    (seed_dir / "mean_rating").write_text("a file where the run's folder should be")
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: reproduce.main(with_seeds(study.argv, *SEEDS, 224)))
    assert stopped.value.code != 0
    output = capsys.readouterr()
    assert output.out.count("done before") == 10
    started = output.out.index("[11/15] seed 224 mean rating: testing; the study: about ")
    shown = output.out[started:].splitlines()
    assert "cannot write to" in shown[1]           # run alone: its own lines are shown as it runs
    assert shown[-1] == "[11/15] seed 224 mean rating: FAILED"
    assert "seed 224 mean rating test failed (exit status 2)" in output.err
    assert str(seed_dir / "mean_rating.log") in output.err
    assert "cannot write to" in output.err          # the run's own error, from its log
    assert "Finished runs are kept" in output.err
    assert not (seed_dir / "mean_rating.json").exists()


def test_an_interrupted_meta_training_resumes_from_its_last_checkpoint(study, capsys):
    folder = study.dir / "runs" / "223" / "gru4rec"
    earlier = json.loads((folder / "melo.json").read_text())
    (folder / "melo.json").unlink()
    for last_step in (folder / "melo").glob("*/state/gru4rec_2_*"):
        last_step.unlink()
    untouched = {path: time for path, time in file_times(study.dir / "runs").items()
                 if folder / "melo" not in path.parents and path.name != "melo.log"}
    capsys.readouterr()
    records = reproduce.main(study.argv)
    output = capsys.readouterr()
    assert "[9/10] seed 223 gru4rec MELO: training (resumed from step 1); the study: about 1 min left\n" in output.out
    shown = output.out[output.out.index("(resumed from step 1)"):output.out.index("[9/10] seed 223 gru4rec MELO: RMSE")]
    assert "Resuming from iteration 1" in shown and "MELO iteration 2/2, " in shown   # run alone: its lines shown
    log = (folder / "melo.log").read_bytes().decode()   # with any carriage return
    assert "Resuming from iteration 1" in log and "\r" not in log and "it/s" not in log
    assert records[-2]["metrics"] == earlier["metrics"]      # resuming is exact
    now = file_times(study.dir / "runs")
    assert {path: now.get(path) for path in untouched} == untouched


def test_jobs_run_at_once_with_their_share_of_the_cores_and_meta_runs_after_basic(study, monkeypatch):
    runs = reproduce.plan_runs(study_options.parse_command_line([*study.argv[:-len(RUN_FLAGS) - 1]]), study.dir / "runs")
    running, events, lock = set(), [], threading.Lock()

    def fake_execute(run, number, total, estimate=None):
        with lock:
            running.add(number)
            events.append(("start", run.method, len(running), run.threads))
        time.sleep(0.05)
        with lock:
            running.discard(number)
            events.append(("end", run.method, len(running), run.threads))
        return {"number": number}

    monkeypatch.setattr(reproduce, "execute", fake_execute)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 4)
    records = reproduce.execute_all(runs, jobs=2)
    assert [record["number"] for record in records] == list(range(1, len(runs) + 1))  # in the plan's order
    assert {threads for *_, threads in events} == {2}                                   # 4 cores / 2 jobs
    assert max(count for kind, _, count, _ in events if kind == "start") == 2           # two at once, no more
    first_meta = next(i for i, (kind, method, *_) in enumerate(events) if method not in ("mean_rating", "basic"))
    assert all(method in ("mean_rating", "basic") for _, method, *_ in events[:first_meta])
    assert sum(kind == "end" for kind, *_ in events[:first_meta]) == len(SEEDS) * 2      # every Basic finished first


def test_with_jobs_each_line_of_a_run_is_written_at_once(tmp_path, monkeypatch):
    # Threads share the screen: a line written in two parts (print's text, then its end)
    # lets another run's line land in the middle of it.
    writes = []
    monkeypatch.setattr(reproduce.sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    run = study_plan.Run(223, "gru4rec", "basic", tmp_path, None, ["python", "train_original.py"], threads=1)
    (tmp_path / "basic.json").write_text(json.dumps({"metrics": {"rmse": 1.0, "mae": 0.8}}))
    reproduce.execute(run, 2, 9)
    assert [text for text in writes if text] == ["[2/9] seed 223 gru4rec Basic: done before: RMSE 1.0000 | MAE 0.8000\n"]


def test_runs_go_to_torchrun_with_nproc_per_node(study):
    argv = [*study.argv[:-len(RUN_FLAGS) - 1], "--nproc_per_node=2"]
    runs = reproduce.plan_runs(study_options.parse_command_line(argv), study.dir / "runs")
    for run in runs:
        typed = [reproduce.as_typed(command) for command in (run.train_command, run.test_command) if command]
        if run.method == "mean_rating":
            assert all(command.startswith("python main.py ") for command in typed)
        else:
            script = "train_original.py" if run.method == "basic" else "main.py"
            assert all(command.startswith(f"torchrun --standalone --nproc_per_node=2 {script} --mode=ml-1m")
                       for command in typed)
            assert study_plan.script_flags(run.test_command)[-1] == "--test"


# --- study files and the quick study ---------------------------------------------------------
RESULTS = study_options.PROJECT_DIR / "results"
NOT_FROM_REPRODUCE = {"ml-100k/bert4rec-reference-embedding"}   # benchmarks/reference_embedding.py, then main.py


def settings(study):
    """What a parsed study computes: every setting but how it was typed and run."""
    return {name: value for name, value in vars(study).items()
            if name not in ("command", "study_files", "jobs", "nproc_per_node", "report_finished")}


def test_a_study_file_gives_flags_that_later_flags_override(study, tmp_path):
    study_file = tmp_path / "tiny.txt"
    study_file.write_text("# a comment line\n" + " ".join(study.argv[:study.argv.index("--")]).replace(" --", "\n--")
                          + "   # a comment after flags\n-- " + " ".join(RUN_FLAGS) + "\n")
    from_file = study_options.parse_command_line([f"@{study_file}"])
    assert settings(from_file) == settings(study_options.parse_command_line(study.argv))
    assert from_file.study_files == [str(study_file)]
    overridden = study_options.parse_command_line([f"@{study_file}", "--seeds", "7", "--", "--bert_dropout=0"])
    assert overridden.seeds == [7]
    assert overridden.run_flags == [*RUN_FLAGS, "--bert_dropout=0"]
    with pytest.raises(UserError, match="cannot read the study file .*no_such.txt"):
        study_options.parse_command_line([f"@{tmp_path / 'no_such.txt'}"])


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
    records = [report.with_rounded_per_user(record) for record in study.records]
    records[-1]["metrics"]["per_user"]["user"] = list(reversed(records[-1]["metrics"]["per_user"]["user"]))
    runs, test_users = report.with_users_once_per_seed(records)
    assert runs[-1] == records[-1] and "user" not in runs[-2]["metrics"]["per_user"]
    assert report.with_test_users(runs, test_users) == records


def test_results_json_names_the_study_file(study, tmp_path):
    study_file = tmp_path / "tiny.txt"
    study_file.write_text(" ".join(study.argv[:study.argv.index("--")]) + " -- " + " ".join(RUN_FLAGS))
    reproduce.main([f"@{study_file}"])              # every run done before: reused
    assert json.loads((study.dir / "results.json").read_text())["study"] == [str(study_file)]


def test_the_estimate_learns_the_machines_speed_from_the_runs_that_finished(tmp_path):
    quick = study_options.parse_command_line(["--results_dir", str(tmp_path)])   # GRU4Rec, then BERT4Rec
    runs = reproduce.plan_runs(quick, tmp_path / "runs")
    estimate = study_plan.Estimate(quick, 400, runs)
    expected = {run.label: study_plan.expected_seconds(run, quick, 400) for run in runs}

    def minutes(factors):   # factors: {(method kind, model): factor}
        return sum(seconds * factors[("meta" if run.method in ("maml", "melo") else "basic", run.model)]
                   for run, seconds in zip(runs, expected.values())) / 60

    assert estimate.minutes(runs) == pytest.approx(minutes(dict.fromkeys(
        [(kind, model) for kind in ("basic", "meta") for model in (None, "gru4rec", "bert4rec")], 1.0)))
    first = {run.method + (run.model or ""): run for run in runs}
    estimate.ran(first["basicgru4rec"], 3 * expected[first["basicgru4rec"].label])   # Basic: 3x the guess
    factors = {("basic", None): 3, ("basic", "gru4rec"): 3, ("basic", "bert4rec"): 3,
               ("meta", "gru4rec"): 1, ("meta", "bert4rec"): 1}   # MAML and MELO: the cost model's until one ran
    assert estimate.minutes(runs) == pytest.approx(minutes(factors))
    estimate.ran(first["mamlgru4rec"], 2 * expected[first["mamlgru4rec"].label])     # GRU4Rec MAML: 2x
    factors.update({("meta", "gru4rec"): 2, ("meta", "bert4rec"): 2})   # BERT4Rec: all MAML/MELO runs' factor
    assert estimate.minutes(runs) == pytest.approx(minutes(factors))
    estimate.ran(first["mamlbert4rec"], 0.5 * expected[first["mamlbert4rec"].label])  # BERT4Rec MAML: half
    factors[("meta", "bert4rec")] = 0.5                                 # its own, once it has one
    assert estimate.minutes(runs) == pytest.approx(minutes(factors))
    basic = first["basicgru4rec"]
    basic.folder.mkdir(parents=True)
    basic.record_path.write_text("{}")                 # finished: no longer left
    assert estimate.left() == f"about {round(minutes(factors) - 3 * expected[basic.label] / 60)} min left"


def test_with_neither_a_study_file_nor_data_the_quick_study_runs():
    quick = study_options.parse_command_line([])
    assert quick.study_files == [study_options.QUICK_STUDY]
    assert quick.name == "quick"
    assert quick.data_path == "./Data/ml-latest-small/ratings.csv.gz"
    assert (study_options.PROJECT_DIR / quick.data_path).is_file()
    assert study_options.parse_command_line(["--models", "narm"]).models == ["narm"]
    own_data = study_options.parse_command_line(["--data_path=ratings.dat"])
    assert own_data.study_files == [] and own_data.pretrain_epochs == parse_args([]).pretrain_epochs


def test_the_quick_study_is_expected_to_take_at_most_ten_minutes(tmp_path, monkeypatch):
    quick = study_options.parse_command_line(["--results_dir", str(tmp_path)])
    runs = reproduce.plan_runs(quick, tmp_path / "runs")
    data = load_data(DataConfig.from_args(study_options.check_run_flags(quick)))
    summary = reproduce.plan_summary(quick, runs, data.stats, tmp_path / "runs")
    minutes = int(summary.split("expected: about ")[1].split()[0])
    assert 3 <= minutes <= 10
    assert f"{len(runs)} runs (0 finished earlier)" in summary
    # two runs at once on two cores: one thread each, each slower than on two
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    in_pairs = study_options.parse_command_line(["--results_dir", str(tmp_path), "--jobs", "2"])
    summary = reproduce.plan_summary(in_pairs, runs, data.stats, tmp_path / "runs")
    seconds = sum(study_plan.expected_seconds(run, quick, data.stats["num_train_users"]) for run in runs)
    assert f"expected: about {round(seconds * study_plan.ONE_THREAD_SLOWDOWN / 2 / 60)} min" in summary
    assert reproduce.threads_per_run(2) == 1 and reproduce.threads_per_run(1) == 2


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
    assert (tmp_path / "per_rating.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_variants_are_runs_of_their_own_with_their_flags(study, tmp_path):
    argv = [*study.argv[:study.argv.index("--")], "--variants", "maml_inverse_frequency", "melo_rating_blind", "--",
            *RUN_FLAGS]
    options = study_options.parse_command_line(argv)
    assert options.methods == ["basic", "maml", "melo", "melo_normalized", "maml_inverse_frequency", "melo_rating_blind"]
    runs = {run.method: run for run in reproduce.plan_runs(options, tmp_path) if run.seed == SEEDS[0]}
    inverse, blind = runs["maml_inverse_frequency"], runs["melo_rating_blind"]
    assert {"--use_adaptive_loss=False", "--inverse_frequency_weights=True"} <= set(inverse.train_command)
    assert "--rating_blind_encoder=True" in blind.train_command
    assert (inverse.files.method, blind.files.method) == ("maml", "melo")
    assert report.TITLES["maml_inverse_frequency"] == "MAML (inverse-frequency weights)"
    ablation = {run.method: run for run in reproduce.plan_runs(
        study_options.parse_command_line([*study.argv[:study.argv.index("--")], "--variants", "melo_mlp_encoder"]),
        tmp_path)}["melo_mlp_encoder"]
    assert {"--use_lstm=False", "--use_mlp=True"} <= set(ablation.train_command) and ablation.files.method == "melo"
    with pytest.raises(UserError, match="--rating_blind_encoder after `--`"):
        study_options.check_run_flags(study_options.parse_command_line([*argv, "--rating_blind_encoder=True"]))


def test_the_tuned_step_is_the_maml_run_of_the_best_validation_rmse(study, tmp_path, monkeypatch):
    shutil.copytree(study.dir, tmp_path / "tiny")   # Basic, MAML and MELO are reused
    # the largest step made huge: its run diverges at once, which a grid run may
    monkeypatch.setitem(reproduce.META_FLAGS, "maml_inner_lr_1",
                        [*reproduce.META_FLAGS["maml_inner_lr_1"], "--inner_lr=1e38"])
    split = study.argv.index("--")
    argv = [*with_seeds(study.argv, SEEDS[0])[:split - 1], "--variants", "maml_tuned_step",
            f"--results_dir={tmp_path}", *study.argv[split:]]
    records = reproduce.main(argv)
    by_method = {record["method"]: record for record in records if record["model"] == "gru4rec"}
    grid = study_options.TUNED_VARIANTS["maml_tuned_step"][1]
    assert grid == ("maml", *(f"maml_inner_lr_{rate}" for rate in ("0.003", "0.01", "0.03", "0.1", "0.3", "1")))
    for method in grid[1:]:
        train_command = by_method[method]["commands"][0]
        assert f"--inner_lr={method.rsplit('_', 1)[1]}" in train_command
        assert "--use_adaptive_loss=False" in train_command
    diverged = by_method["maml_inner_lr_1"]
    assert diverged["diverged"] and diverged["metrics"] is None and diverged["validation_rmse"] is None
    assert not any(by_method[method]["diverged"] for method in grid[:-1])
    validation = {method: by_method[method]["validation_rmse"] for method in grid}
    assert len(set(validation.values())) == len(grid)      # the rates made different runs
    tuned = by_method["maml_tuned_step"]
    assert tuned["validation_rmse_of_runs"] == validation
    assert tuned["chosen_run"] == min(grid[:-1], key=validation.get)
    assert tuned["metrics"] == by_method[tuned["chosen_run"]]["metrics"]
    table = (tmp_path / "tiny" / "table.md").read_text()
    assert "| GRU4Rec | MELO − MAML (inner step tuned on validation) |" in table
    chosen = table_rows(table[table.index("## Tuned on validation"):])["MAML (inner step tuned on validation)"]
    assert (chosen["Seed"], chosen["Chosen"]) == (str(SEEDS[0]), report.TITLES[tuned["chosen_run"]])
    assert chosen["MAML (--inner_lr=0.1) validation RMSE"] == f"{validation['maml_inner_lr_0.1']:.4f}"
    assert chosen["MAML (--inner_lr=1) validation RMSE"] == "diverged"
    assert report.render(tmp_path / "tiny" / "results.json") == table
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    written = {record["method"]: record for record in report.with_test_users(results["runs"], results["test_users"])
               if record["model"] == "gru4rec"}
    assert "per_user" not in written["maml_inner_lr_0.1"]["metrics"]   # a grid run's: only in its own record
    assert written["maml_tuned_step"]["metrics"]["per_user"] == report.with_rounded_per_user(tuned)["metrics"]["per_user"]
    assert reproduce.main(argv) == records               # the diverged run is not run again
    shutil.rmtree(tmp_path / "tiny" / "runs")           # the chosen run's per-user errors come back from its copy
    reproduce.main([*argv[:argv.index("--")], "--from_results", *argv[argv.index("--"):]])
    assert (tmp_path / "tiny" / "table.md").read_text() == table


def test_a_tuned_variant_refuses_runs_recorded_without_their_validation_rmse(study):
    options = study_options.parse_command_line([*study.argv[:study.argv.index("--")], "--variants", "maml_tuned_step"])
    records = [{**record, "validation_rmse": None if record["method"] == "maml" else 1.0}
               for record in study.records] + [
        {**record, "method": method} for record in study.records if record["method"] == "maml"
        for method in study_options.TUNED_VARIANTS["maml_tuned_step"][1][1:]]
    with pytest.raises(UserError, match=r"maml\.json has no validation RMSE .*delete it"):
        reproduce.tuned_records(options, records)
