"""reproduce.py: one command from a rating file to the results table, on the tiny study
(tiny_study.py): what one invocation writes, invoking it again (reuse, resuming, failures),
--jobs, study files, the estimate, and the variants.
"""
import json
import os
import shutil
import threading
import time
from types import SimpleNamespace

import pytest

from config import DataConfig
from dataloader import load_data
from meta_learning.evaluation import paired_rmse_difference
from options import parse_args
import report
import reproduce
from run.errors import UserError, run_cli
from study import records, results_json, study_options, study_plan
from tiny_study import RUN_FLAGS, SEEDS, METHODS, with_seeds, table_rows, file_times, metric, method_rows, settings


# --- what one invocation writes ---------------------------------------------------------
def test_every_run_is_recorded_with_the_metrics_its_test_wrote(study):
    results = json.loads((study.dir / "results.json").read_text())
    assert results_json.with_test_users(results["runs"], results["test_users"]) == [
        results_json.with_rounded_per_user(record) for record in study.records]
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
    reported = reproduce.main(argv)
    assert ": training" not in capsys.readouterr().out and file_times(tmp_path / "tiny" / "runs") == before
    assert sorted((r["seed"], r["method"]) for r in reported) == sorted(
        (SEEDS[0], method) for method in ("mean_rating", *METHODS))
    table = (tmp_path / "tiny" / "table.md").read_text()
    assert f"for every method (seed {SEEDS[0]})" in table
    for method, title in (("maml", "MAML"), ("melo", "MELO")):
        assert method_rows(table)["GRU4Rec", title]["RMSE"] == f"{metric(study, 'gru4rec', method, 'rmse')[0]:.4f}"
    assert report.render(tmp_path / "tiny" / "results.json") == table
    waiting = json.loads((tmp_path / "tiny" / "results.json").read_text())["waiting_runs"]   # not in the table
    assert sorted((r["seed"], r["method"]) for r in waiting) == [(SEEDS[1], m) for m in sorted(
        ("mean_rating", "basic", "maml", "melo_normalized"))]
    maml, normalized = (next(r for r in waiting if r["method"] == m) for m in ("maml", "melo_normalized"))
    versus_maml = report.interval_cell(paired_rmse_difference(normalized["metrics"]["per_user"]["squared_error"],
                                                              maml["metrics"]["per_user"]["squared_error"]))
    assert (f"| {SEEDS[1]} | GRU4Rec | {report.TITLES['melo_normalized']} | {normalized['metrics']['rmse']:.4f} | "
            f"{normalized['checkpoint_step']} | {versus_maml} |") in table
    for seed in SEEDS:
        (tmp_path / "tiny" / "runs" / str(seed) / "gru4rec" / "basic.json").unlink()
    assert [r for r in reproduce.main(argv) if r["model"] is not None] == []      # no table: the records wait
    assert "No model has finished every run of a seed yet" in (tmp_path / "tiny" / "table.md").read_text()
    assert not (tmp_path / "tiny" / "per_rating.png").exists()                   # of whole sets alone
    assert (tmp_path / "tiny" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # of every finished run
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert results["runs"] == [] and len(results["waiting_runs"]) == len(reproduce.finished_records(
        tmp_path / "tiny" / "runs"))
    assert results["sha256"] == records.digest(results)
    shutil.rmtree(tmp_path / "tiny" / "runs")                     # a lost machine: the waiting runs come back
    options = study_options.parse_command_line(argv)
    plan = reproduce.plan_runs(options, tmp_path / "tiny" / "runs")
    reproduce.restore_finished_runs(options, tmp_path / "tiny", plan)
    restored = {(r["seed"], r["model"], r["method"]) for r in map(reproduce.finished_record, (
        run for run in plan if run.record_path.is_file()))}
    assert restored == {(r["seed"], r["model"], r["method"]) for r in results["waiting_runs"]}
    with pytest.raises(UserError, match="nothing to report"):   # a study not started: nothing is written
        reproduce.main([flag.replace("--name=tiny", "--name=not_started") for flag in argv])
    assert not (tmp_path / "not_started").exists()


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
    assert output.out.count("done before") == 4        # the baselines and Basic of every seed start first
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


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_seeds_maml_and_melo_start_before_any_variant(study, tmp_path, monkeypatch, jobs):
    argv = [*study.argv[:study.argv.index("--")], "--variants", "melo_rating_blind", "--", *RUN_FLAGS]
    options = study_options.parse_command_line(argv)
    variants = options.run_methods[3:]                       # after Basic, MAML and MELO: the rating-blind one too
    runs, started = reproduce.plan_runs(options, tmp_path), []
    monkeypatch.setattr(reproduce, "execute", lambda run, number, *_: started.append((run.method, run.seed)) or number)
    records = reproduce.execute_all(runs, jobs=jobs)
    assert records == list(range(1, len(runs) + 1))                                    # in the plan's order
    meta = [(method, seed) for method, seed in started if method not in ("mean_rating", "basic")]
    assert meta == [*((method, seed) for seed in SEEDS for method in ("maml", "melo")),
                    *((method, seed) for seed in SEEDS for method in variants)] and "melo_rating_blind" in variants
    assert all(method in ("mean_rating", "basic") for method, _ in started[:len(started) - len(meta)])


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


def test_a_study_file_reads_another_beside_it_and_overrides_it(study, tmp_path):
    (tmp_path / "base.txt").write_text(" ".join(study.argv[:study.argv.index("--")])
                                       + " -- " + " ".join(RUN_FLAGS) + "\n")
    (tmp_path / "variant").mkdir()
    (tmp_path / "variant" / "shorter.txt").write_text("# the base study, one seed\n@../base.txt\n"
                                                      "--seeds 7 -- --bert_dropout=0\n")
    variant = study_options.parse_command_line([f"@{tmp_path / 'variant' / 'shorter.txt'}"])
    assert settings(variant) == dict(settings(study_options.parse_command_line(study.argv)), seeds=[7],
                                     run_flags=[*RUN_FLAGS, "--bert_dropout=0"])
    assert variant.study_files == [str(tmp_path / "variant" / "shorter.txt")]   # what the command gave
    (tmp_path / "base.txt").write_text("--seeds 1\n@variant/shorter.txt\n")
    with pytest.raises(UserError, match=r"read each other in a circle \(base.txt -> shorter.txt -> base.txt\)"):
        study_options.parse_command_line([f"@{tmp_path / 'base.txt'}"])


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
    left = minutes(factors) - 3 * expected[basic.label] / 60
    assert estimate.left() == f"about {round(left)} min left"
    maml = first["mamlgru4rec"]
    maml.files.make()
    maml.files.checkpoint(maml.final_step // 2, best=False).write_bytes(b"")   # to resume from half-way
    assert maml.share_left() == 0.5
    assert estimate.left() == f"about {round(left - 0.5 * 2 * expected[maml.label] / 60)} min left"


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
    monkeypatch.setitem(study_plan.META_FLAGS, "maml_inner_lr_1",
                        [*study_plan.META_FLAGS["maml_inner_lr_1"], "--inner_lr=1e38"])
    title, whole_grid = study_options.TUNED_VARIANTS["maml_tuned_step"]
    assert whole_grid == ("maml", *(f"maml_inner_lr_{rate}" for rate in ("0.003", "0.01", "0.03", "0.1", "0.3", "1")))
    grid = ("maml", "maml_inner_lr_0.1", "maml_inner_lr_1")    # two new runs of the six: the test's time
    monkeypatch.setitem(study_options.TUNED_VARIANTS, "maml_tuned_step", (title, grid))
    split = study.argv.index("--")
    argv = [*with_seeds(study.argv, SEEDS[0])[:split - 1], "--variants", "maml_tuned_step",
            f"--results_dir={tmp_path}", *study.argv[split:]]
    records = reproduce.main(argv)
    by_method = {record["method"]: record for record in records if record["model"] == "gru4rec"}
    assert {method for method in by_method if method.startswith("maml_inner_lr_")} == set(grid[1:])
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
    written = {record["method"]: record for record in results_json.with_test_users(results["runs"], results["test_users"])
               if record["model"] == "gru4rec"}
    assert "per_user" not in written["maml_inner_lr_0.1"]["metrics"]   # a grid run's: only in its own record
    assert written["maml_tuned_step"]["metrics"]["per_user"] == results_json.with_rounded_per_user(tuned)["metrics"]["per_user"]
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
