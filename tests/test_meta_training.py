"""MAML / MELO meta-training runs (main.py): training, checkpoints and resuming, testing,
Basic's pretrained files, and the runs that stop on a non-finite number."""
import json
import math
import os

import pytest
import torch

from config import DataConfig, MetaRunConfig, RunFilesConfig
from dataloader import load_data
from fixtures import TINY, run_dir, tiny_args, write_ratings
import main
from options import parse_args
from run import run_files
from run.atomic_files import load_checked
from run.errors import UserError
from run.start import setup
import train_original

MODELS = ("bert4rec", "sasrec", "gru4rec", "narm", "ncf")


# --- training lowers the query loss ---------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("use_adaptive_loss", [False, True])
def test_meta_training_lowers_the_query_loss_on_a_fixed_batch(ratings_file, tmp_path, model,
                                                              use_adaptive_loss):
    args = tiny_args(ratings_file, f"--model={model}", "--bert_dropout=0", "--outer_lr=0.01",
                     f"--use_adaptive_loss={use_adaptive_loss}", f"--log_dir={tmp_path}")
    data = load_data(DataConfig.from_args(args))
    trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
    batch = trainer.sampler.train_batch(4)
    before = trainer.learner.meta_loss(batch, iteration=0)[0].item()
    for _ in range(8):
        trainer.train_step(batch)
    after = trainer.learner.meta_loss(batch, iteration=0)[0].item()
    assert after < 0.9 * before


# --- checkpoints, resuming, testing ------------------------------------------------------------
def run_main(ratings_file, tmp_path, *extra):
    return main.main([f"--data_path={ratings_file}", *TINY, f"--log_dir={tmp_path / 'log'}",
                      f"--pretrain_log_dir={tmp_path / 'pre'}", *extra])


def learner_state(log_dir, step):
    return load_checked(run_dir(log_dir) / "state" / f"bert4rec_{step}_ml-1m_melo.pt", weights_only=False)["learner"]


# compiled: one inner step keeps the cold compilation near a minute; dropout is on in both
@pytest.mark.parametrize("compiled", [[], pytest.param(["--compile=True", "--num_inner_steps=1"], marks=pytest.mark.compile)],
                         ids=["eager", "compiled"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(ratings_file, tmp_path, monkeypatch, compiled):
    flags = ["--num_train_iterations=4", "--log_interval=2", "--multi_step_loss_num_epochs=3", *compiled]
    trainer = run_main(ratings_file, tmp_path / "whole", *flags)
    # no recompilation: a graph per batch shape at most (none where an earlier test compiled it)
    shapes = len(trainer.meta_gradient.graph_shapes)
    assert shapes == (1 if compiled else 0) and trainer.meta_gradient.graphs_compiled <= shapes

    original_step = main.MetaTrainer.train_step

    def killed_at_three(self, batch):
        if self.iteration == 2:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(main.MetaTrainer, "train_step", killed_at_three)
    with pytest.raises(KeyboardInterrupt):
        run_main(ratings_file, tmp_path / "killed", *flags)
    monkeypatch.setattr(main.MetaTrainer, "train_step", original_step)
    run_main(ratings_file, tmp_path / "killed", *flags, "--checkpoint_step=2")

    whole, resumed = learner_state(tmp_path / "whole" / "log", 4), learner_state(tmp_path / "killed" / "log", 4)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_other_rates_or_length_go_on_from_a_checkpoint_as_a_run_of_their_own(ratings_file, tmp_path, capsys):
    flags = ["--num_train_iterations=4", "--log_interval=2"]
    run_main(ratings_file, tmp_path, *flags)
    first = run_dir(tmp_path / "log")
    # other rates or another length are another run: --checkpoint_step finds no step 2 of it
    with pytest.raises(UserError, match=r"for step 2; .*or settings: .*num_train_iterations 4 there, 6 here\).*--resume_from"):
        run_main(ratings_file, tmp_path, "--num_train_iterations=6", "--log_interval=2", "--checkpoint_step=2")
    checkpoint = first / "state" / "bert4rec_2_ml-1m_melo.pt"
    trainer = run_main(ratings_file, tmp_path, "--num_train_iterations=6", "--log_interval=2", "--outer_lr=0.5",
                       "--lstm_lr=0.05", f"--resume_from={checkpoint}")
    out = capsys.readouterr().out
    assert "Resuming with changed settings: --outer_lr 0.001 -> 0.5, --lstm_lr 0.1 -> 0.05, " \
           "--num_train_iterations 4 -> 6" in out and f"Starting from iteration 2 of {checkpoint}" in out
    # the last of 6 iterations ran at the rates of cosine schedules from the new rates
    meta, encoder = trainer.optimizers["meta"], trainer.optimizers["encoder"]
    assert meta.param_groups[0]["lr"] == pytest.approx(1e-4 + (0.5 - 1e-4) * (1 + math.cos(math.pi * 5 / 6)) / 2)
    assert encoder.param_groups[0]["lr"] == pytest.approx(1e-2 + (0.05 - 1e-2) * (1 + math.cos(math.pi * 5 / 6)) / 2)
    assert trainer.files.folder != first
    assert sorted(p.name for p in (first / "state").glob("bert4rec_*_ml-1m_melo.pt") if "_best_" not in p.name) == [
        "bert4rec_2_ml-1m_melo.pt", "bert4rec_4_ml-1m_melo.pt"]                    # the first run's, untouched
    resumed = load_checked(trainer.files.checkpoint(6, best=False), weights_only=False)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["iteration"] == 6
    # another shape or method cannot go on from it
    with pytest.raises(UserError, match=r"--lstm_hidden=8 \(now 12\); these cannot change"):
        run_main(ratings_file, tmp_path, *flags, "--lstm_hidden=12", f"--resume_from={checkpoint}")
    with pytest.raises(UserError, match=r"--use_adaptive_loss=True \(now False\)"):
        run_main(ratings_file, tmp_path, *flags, "--use_adaptive_loss=False", f"--resume_from={checkpoint}")
    with pytest.raises(UserError, match=r"was made for other data or settings: bert_hidden_units 8 \(now 12\)"):
        run_main(ratings_file, tmp_path, *flags, "--bert_hidden_units=12", f"--resume_from={checkpoint}")


def test_test_uses_the_same_targets_as_basic(ratings_file, tmp_path):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1")
    melo = run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1", "--test", "--checkpoint_step=2")
    assert math.isfinite(melo["rmse"]) and math.isfinite(melo["mae"])
    result = json.loads((run_dir(tmp_path / "log") / "state" / "bert4rec_2_best_ml-1m_melo_test.json").read_text())
    assert result["metrics"]["rmse"] == pytest.approx(melo["rmse"])
    assert result["config"]["num_test_data"] == 8
    # the tested encoder's mean loss weight per rating of the test support sets
    weights = result["encoder_weight_per_rating"]
    assert set(weights) == {"1", "2", "3", "4", "5"} and all(w > 0 for w in weights.values())
    args, device, data = setup([f"--data_path={ratings_file}", *TINY, f"--log_dir={tmp_path / 'log'}", "--num_train_iterations=2", "--log_interval=1"])
    tested = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, device)
    tested.load(2, best=True, resume=False)
    tested.learner.eval()
    assert weights == pytest.approx(tested.learner.mean_weight_per_rating(tested.sampler.fixed_tasks("test")))
    untrained = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, device).learner.eval()
    assert weights != pytest.approx(untrained.mean_weight_per_rating(tested.sampler.fixed_tasks("test")))

    again = run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1", "--test", "--checkpoint_step=2")
    assert again["rmse"] == melo["rmse"]  # fixed test tasks: the same number every time

    flags = [f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path / 'pre'}"]
    train_original.main([*flags, "--pretrain_epochs=1"])
    basic = train_original.main([*flags, "--test", "--checkpoint_step=1"])
    baseline = run_main(ratings_file, tmp_path, "--test_baseline")
    for other in (basic, baseline):
        assert other["num_users"] == melo["num_users"] == 8
        assert other["num_targets"] == melo["num_targets"]
        assert {k: v["count"] for k, v in other["per_rating"].items()} == \
            {k: v["count"] for k, v in melo["per_rating"].items()}


def test_missing_checkpoint_lists_the_steps_that_exist(ratings_file, tmp_path):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1")
    with pytest.raises(UserError, match=r"steps with a checkpoint: 1, 2"):
        run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1", "--test", "--checkpoint_step=7", "--test_best")


def test_missing_pretrained_embedding_names_the_command(ratings_file, tmp_path):
    with pytest.raises(UserError, match=r"train_original.py .*--save_pretrained=True"):
        run_main(ratings_file, tmp_path, "--load_pretrained_embedding=True")


def test_pretrained_embedding_of_other_settings_is_never_loaded(ratings_file, tmp_path):
    flags = [f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path / 'pre'}"]
    train_original.main([*flags, "--pretrain_epochs=1", "--save_pretrained=True"])
    # another seed (other test users) or size is another run: no embedding of its own yet
    with pytest.raises(UserError, match="no pretrained embedding at .*seed223"):
        run_main(ratings_file, tmp_path, "--load_pretrained_embedding=True", "--random_seed=223")
    with pytest.raises(UserError, match="no pretrained embedding at"):
        run_main(ratings_file, tmp_path, "--load_pretrained_embedding=True", "--max_seq_len=9")
    # seed 222's embedding copied where seed 223's belongs is refused, not borrowed
    args = parse_args([*flags, "--random_seed=223"])
    theirs = next((tmp_path / "pre").glob("*/embedding/*"))
    ours = run_files.pretrained_paths(RunFilesConfig.from_args(args))["embedding"]
    ours.parent.mkdir(parents=True)
    ours.write_bytes(theirs.read_bytes())
    with pytest.raises(UserError, match=r"was made for other data or settings: random_seed 222 \(now 223\)"):
        run_main(ratings_file, tmp_path, "--load_pretrained_embedding=True", "--random_seed=223")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(ratings_file, tmp_path, monkeypatch):
    original, calls = main.MetaLearner.forward, []

    def poisoned(self, task, step_weights):   # the meta-objective, once per outer iteration
        calls.append(1)
        loss, predictions = original(self, task, step_weights)
        return (loss * math.nan if len(calls) == 3 else loss), predictions

    monkeypatch.setattr(main.MetaLearner, "forward", poisoned)
    with pytest.raises(UserError, match="became nan at iteration 3"):
        run_main(ratings_file, tmp_path, "--num_train_iterations=4", "--log_interval=2")
    assert (run_dir(tmp_path / "log") / "state" / "bert4rec_2_ml-1m_melo.pt").is_file()


def test_a_nan_at_validation_writes_no_checkpoint_and_the_last_one_resumes(ratings_file, tmp_path, monkeypatch):
    original = main.MetaTrainer.evaluate

    def poisoned(self, batch):
        metrics = original(self, batch)
        return {**metrics, "rmse": math.nan} if self.iteration == 4 else metrics

    monkeypatch.setattr(main.MetaTrainer, "evaluate", poisoned)
    with pytest.raises(UserError, match=r"validation RMSE became nan at iteration 4: .*iteration 2\) is kept"):
        run_main(ratings_file, tmp_path, "--num_train_iterations=6", "--log_interval=2")
    state = run_dir(tmp_path / "log") / "state"
    assert sorted(p.name for p in state.glob("*.pt")) == ["bert4rec_2_best_ml-1m_melo.pt", "bert4rec_2_ml-1m_melo.pt"]
    monkeypatch.setattr(main.MetaTrainer, "evaluate", original)
    trainer = run_main(ratings_file, tmp_path, "--num_train_iterations=6", "--log_interval=2", "--checkpoint_step=2")
    assert trainer.iteration == 6 and (state / "bert4rec_6_ml-1m_melo.pt").is_file()


def test_a_nan_test_result_is_an_error_and_writes_no_json(ratings_file, tmp_path, monkeypatch):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2")
    original = main.MetaTrainer.evaluate
    monkeypatch.setattr(main.MetaTrainer, "evaluate", lambda self, batch: {**original(self, batch), "mae": math.inf})
    with pytest.raises(UserError, match="no result is written"):
        run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2", "--test", "--checkpoint_step=2")
    assert not list((run_dir(tmp_path / "log") / "state").glob("*.json"))


def test_testing_needs_only_the_checkpoint(ratings_file, tmp_path, capsys):
    """The reference README's test command names --load_pretrained_embedding=True: the
    checkpoint holds every parameter, so Basic's embedding need not exist any more."""
    flags = ["--num_train_iterations=2", "--log_interval=2", "--load_pretrained_embedding=True"]
    train_original.main([f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path / 'pre'}",
                         "--pretrain_epochs=1", "--save_pretrained=True"])
    run_main(ratings_file, tmp_path, *flags)
    out = capsys.readouterr().out
    assert "test the best one with the same flags and --test --checkpoint_step=2" in out
    for embedding in (tmp_path / "pre").glob("*/embedding/*"):
        embedding.unlink()
    metrics = run_main(ratings_file, tmp_path, *flags, "--test", "--checkpoint_step=2")
    assert math.isfinite(metrics["rmse"])
    checkpoint = run_dir(tmp_path / "log") / "state" / "bert4rec_2_best_ml-1m_melo.pt"
    assert f"Loading checkpoint from {checkpoint}" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert checkpoint.stat().st_mode & 0o777 == 0o666 & ~umask  # like any other file, not 0600


def test_seeds_and_datasets_in_the_same_folders_keep_their_own_files(ratings_file, tmp_path):
    other_data = write_ratings(tmp_path / "other" / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=4)
    runs = [(ratings_file, 222), (ratings_file, 223), (other_data, 222)]
    for data, seed in runs:
        train_original.main([f"--data_path={data}", *TINY, f"--pretrain_log_dir={tmp_path / 'pre'}",
                             f"--random_seed={seed}", "--pretrain_epochs=1", "--save_pretrained=True"])
        main.main([f"--data_path={data}", *TINY, f"--log_dir={tmp_path / 'log'}", f"--random_seed={seed}",
                   f"--pretrain_log_dir={tmp_path / 'pre'}", "--num_train_iterations=2", "--log_interval=2",
                   "--load_pretrained_embedding=True"])
    for root in ("pre", "log"):
        assert len(list((tmp_path / root).glob("*/state"))) == 3, "one folder per run, nothing overwritten"
    for data, seed in runs:
        metrics = main.main([f"--data_path={data}", *TINY, f"--log_dir={tmp_path / 'log'}", f"--random_seed={seed}",
                             "--num_train_iterations=2", "--log_interval=2", "--load_pretrained_embedding=True",
                             "--test", "--checkpoint_step=2"])
        record = json.loads(next((tmp_path / "log").glob(f"{data.parent.name}-ratings_seed{seed}_*/state/*_test.json"))
                            .read_text())
        assert record["identity"]["random_seed"] == seed and record["identity"]["data"].startswith(data.parent.name)
        assert record["metrics"]["rmse"] == pytest.approx(metrics["rmse"])


def test_a_new_run_refuses_an_earlier_runs_checkpoints_unless_told_to_overwrite(ratings_file, tmp_path):
    flags = ["--num_train_iterations=2", "--log_interval=1"]
    run_main(ratings_file, tmp_path, *flags)
    state = run_dir(tmp_path / "log") / "state"
    before = sorted(p.name for p in state.iterdir())
    with pytest.raises(UserError, match=r"holds checkpoints of an earlier MELO run .*steps 1, 2.*"
                                        r"--checkpoint_step=2.*--overwrite=True"):
        run_main(ratings_file, tmp_path, *flags)
    assert sorted(p.name for p in state.iterdir()) == before
    run_main(ratings_file, tmp_path, *flags, "--use_adaptive_loss=False")  # MAML's own names: no conflict
    maml = sorted(p.name for p in state.glob("*_maml.pt"))
    old = {p.name: p.stat().st_mtime_ns for p in state.glob("*_melo*")}
    run_main(ratings_file, tmp_path, *flags, "--overwrite=True")
    melo = {p.name: p.stat().st_mtime_ns for p in state.glob("*_melo*")}
    assert all(melo[name] > old[name] for name in old if name in melo), "the old run's checkpoints are gone"
    events = list((state.parent / "runs" / "bert4rec_ml-1m_melo").glob("events.*"))
    assert len(events) == 1, "the old run's TensorBoard curves are gone too"
    assert sorted(p.name for p in state.glob("*_maml.pt")) == maml


def test_test_without_a_step_takes_the_latest_best_checkpoint(ratings_file, tmp_path, capsys):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1")
    best_steps = sorted(int(p.name.split("_")[1]) for p in (run_dir(tmp_path / "log") / "state").glob("*_best_*.pt"))
    metrics = run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1", "--test")
    assert f"Testing the latest checkpoint, step {best_steps[-1]}" in capsys.readouterr().out
    assert metrics == run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=1", "--test", f"--checkpoint_step={best_steps[-1]}")


def test_test_without_any_checkpoint_says_to_train_first(ratings_file, tmp_path):
    with pytest.raises(UserError, match="nothing to test"):
        run_main(ratings_file, tmp_path, "--test")


def test_a_run_that_never_beats_the_mean_rating_says_so(ratings_file, tmp_path, capsys):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2", "--inner_lr=1e6",
             "--use_adaptive_loss=False")
    out = capsys.readouterr().out
    assert "warning: the best validation RMSE" in out and "worse than predicting the training mean" in out
