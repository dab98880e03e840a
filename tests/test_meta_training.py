"""MAML / MELO meta-training (main.py, meta_learning/meta_learner.py) on small fixture data."""
import json
import math
import os

import pytest
import torch

from config import DataConfig
from dataloader import load_data
from fixtures import METHOD_FLAGS, TINY, run_dir, tiny_args, tiny_learner, write_ratings
import main
from meta_learning.inner_loop_execution import default_recompute_steps, default_support_chunks, one_task
from meta_learning.meta_learner import importance_vector
from options import PADDING_FREE_MODELS, FlagError, parse_args
from run import run_files
from run.atomic_files import load_checked
from run.errors import UserError
from run.start import setup
import train_original

MODELS = ("bert4rec", "sasrec", "gru4rec", "narm", "ncf")


def outer_step(learner, batch, num_inner_steps, use_vmap=True):
    """Every step's query losses, the target predictions, and the meta-gradient of their
    batch mean (None for a parameter that the step does not reach)."""
    losses, predictions = learner.adapt(learner.task_tensors(batch), range(num_inner_steps), use_vmap=use_vmap)
    gradients = torch.autograd.grad(losses.sum(dim=1).mean(),
                                    [p for p in learner.parameters() if p.requires_grad],
                                    allow_unused=True)
    return losses, predictions, gradients


# --- the MAML++ multi-step importance vector ----------------------------------------------
@pytest.mark.parametrize("iteration", [0, 250, 500, 1000, 5000])
def test_importance_vector_follows_its_formula(iteration):
    J, N = 3, 1000
    weights = importance_vector(iteration, J, N)
    non_final = max(1 / J - iteration / (J * N), 0.03 / J)
    final = min(1 / J + iteration * (J - 1) / (J * N), 1 - (J - 1) * 0.03 / J)
    assert weights.tolist() == pytest.approx([non_final, non_final, final])
    assert weights.sum().item() == pytest.approx(1.0)


def test_importance_vector_at_the_ends():
    assert importance_vector(0, 4, 100).tolist() == pytest.approx([0.25] * 4)
    assert importance_vector(100, 4, 100).tolist() == pytest.approx([0.0075] * 3 + [1 - 3 * 0.0075])


# --- vmap and the per-task loop give the same meta-gradients --------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["maml", "melo", "melo-mlp", "melo-variants"])
def test_vmap_and_loop_agree_on_an_outer_step(ratings_file, model, method):
    # the reference's NCF is linear and unbounded: a cubic loss in stars diverges at lr >= 0.01
    inner_lr = 0.001 if (model, method) == ("ncf", "melo-variants") else 0.1
    args, learner, batch = tiny_learner(ratings_file, f"--model={model}", "--bert_dropout=0",
                                        f"--inner_lr={inner_lr}", *METHOD_FLAGS[method], dtype=torch.float64)
    learner.train()
    results = [outer_step(learner, batch, args.num_inner_steps, use_vmap) for use_vmap in (True, False)]
    (losses_v, pred_v, grads_v), (losses_l, pred_l, grads_l) = results
    assert torch.isfinite(losses_v).all()
    torch.testing.assert_close(losses_v, losses_l, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred_v, pred_l, rtol=1e-9, atol=1e-9)
    for g_v, g_l in zip(grads_v, grads_l):
        assert (g_v is None) == (g_l is None)
        if g_v is not None:
            torch.testing.assert_close(g_v, g_l, rtol=1e-5, atol=1e-9)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_v)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_support_chunks_cut_only_padding(ratings_file, chunks):
    args, learner, batch = tiny_learner(ratings_file)
    task = learner.task_tensors(batch, chunks)
    item_chunks = task["support_item_chunks"]
    num_tasks, num_rows, length = batch.support_items.shape
    assert len(item_chunks) == chunks
    # left-padded back to full length, the chunks are each task's rows, longest first
    rows = torch.cat([torch.nn.functional.pad(c, (length - c.shape[-1], 0)) for c in item_chunks], dim=1)
    torch.testing.assert_close((rows > 0).float(), task["support_mask"])
    lengths = task["support_mask"].sum(-1)
    assert (lengths[:, :-1] >= lengths[:, 1:]).all()
    for t in range(num_tasks):
        assert sorted(map(tuple, rows[t].tolist())) == sorted(map(tuple, batch.support_items[t].tolist()))
    if chunks == 4:
        assert sum(c.shape[1] * c.shape[2] for c in item_chunks) < num_rows * length  # something was cut


@pytest.mark.parametrize("model", MODELS)
def test_support_loss_on_chunks_is_the_masked_loss_of_the_batch_as_sampled(ratings_file, model):
    # whole rows, padding included, for the models that read the padding
    args, learner, batch = tiny_learner(ratings_file, f"--model={model}", "--bert_dropout=0",
                                        "--use_adaptive_loss=False", dtype=torch.float64)
    task = learner.task_tensors(batch, support_chunks=4 if model in PADDING_FREE_MODELS else 1)
    params = dict(learner.model.named_parameters())
    for t in range(len(batch)):
        mask = batch.support_mask[t]
        predictions = learner.model(batch.support_items[t])                      # [S, L], whole rows
        expected = (((predictions - batch.support_ratings[t] / 5) ** 2) * mask).sum() / mask.sum()
        loss = learner.support_loss(params, 0, one_task(task, t))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_support_chunks_by_default_only_where_exact_and_on_a_vmapped_cpu_batch(model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    chunks = default_support_chunks(model, cpu, use_vmap=True)
    assert chunks > 1 if model in PADDING_FREE_MODELS else chunks == 1  # cutting padding is exact only there
    assert default_support_chunks(model, cpu, use_vmap=False) == 1
    assert default_support_chunks(model, cuda, use_vmap=True) == 1


@pytest.mark.parametrize("model", [m for m in MODELS if m not in PADDING_FREE_MODELS])
def test_support_chunks_are_refused_for_models_that_read_the_padding(model):
    with pytest.raises(FlagError, match="reads the padding"):
        parse_args([f"--model={model}", "--support_chunks=2"])
    assert parse_args([f"--model={model}", "--support_chunks=1"]).support_chunks == 1


@pytest.mark.parametrize("model", PADDING_FREE_MODELS)
@pytest.mark.parametrize("method", ["maml", "melo", "melo-mlp"])
def test_support_chunks_change_no_outer_step(ratings_file, model, method):
    results = []
    for chunks in (1, 4):
        torch.manual_seed(0)  # the encoders' initialisation
        args, learner, batch = tiny_learner(ratings_file, f"--model={model}", "--bert_dropout=0",
                                            "--inner_lr=0.1", f"--support_chunks={chunks}",
                                            *METHOD_FLAGS[method], dtype=torch.float64)
        batch.support_items[:, -1], batch.support_ratings[:, -1] = 0, 0  # an all-padding chunk
        learner.train()
        losses, predictions, gradients = outer_step(learner, batch, args.num_inner_steps)
        results.append((losses, predictions, [g for g in gradients if g is not None]))
    (losses_1, predictions_1, gradients_1), (losses_4, predictions_4, gradients_4) = results
    torch.testing.assert_close(losses_4, losses_1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(predictions_4, predictions_1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradients_4, gradients_1, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["maml", "melo", "melo-mlp"])
@pytest.mark.parametrize("use_vmap", [True, False])
def test_recomputed_inner_steps_give_the_same_outer_step(ratings_file, model, method, use_vmap):
    # dropout on: the backward must replay the forward's random draws
    results = []
    for recompute in (0, 2):
        torch.manual_seed(0)  # the encoders' initialisation
        args, learner, batch = tiny_learner(ratings_file, f"--model={model}", "--bert_dropout=0.3",
                                            "--inner_lr=0.1", f"--recompute_inner_steps={recompute}",
                                            *METHOD_FLAGS[method], dtype=torch.float64)
        learner.train()
        torch.manual_seed(1)
        results.append((*outer_step(learner, batch, args.num_inner_steps, use_vmap), torch.rand(1)))
    (losses_kept, predictions_kept, gradients_kept, next_draw_kept), \
        (losses_re, predictions_re, gradients_re, next_draw_re) = results
    torch.testing.assert_close(losses_re, losses_kept, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(predictions_re, predictions_kept, rtol=1e-12, atol=1e-12)
    for g_re, g_kept in zip(gradients_re, gradients_kept):
        assert (g_re is None) == (g_kept is None)
        if g_re is not None:
            torch.testing.assert_close(g_re, g_kept, rtol=1e-9, atol=1e-12)
    assert next_draw_re == next_draw_kept  # the replay left the random stream where it was
    assert sum(g.abs().sum() for g in gradients_re if g is not None) > 0


def test_recomputed_steps_keep_no_graph_and_default_to_one_on_the_cpu(ratings_file):
    args, learner, batch = tiny_learner(ratings_file)
    assert args.recompute_inner_steps is None
    assert default_recompute_steps(torch.device("cpu")) == 1 and default_recompute_steps(torch.device("cuda")) == 0
    nodes = []
    for recompute in (0, 1, 2):
        learner.recompute_steps = recompute
        losses, _ = learner.adapt(learner.task_tensors(batch), range(args.num_inner_steps))
        nodes.append(count_graph_nodes(losses))
    assert nodes[0] > nodes[1] > nodes[2]


def count_graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_melo_weights_reach_the_support_loss(ratings_file):
    args, learner, batch = tiny_learner(ratings_file, "--bert_dropout=0", dtype=torch.float64)
    task = one_task(learner.with_encoder_weights(learner.task_tensors(batch)), 0)
    params = dict(learner.model.named_parameters())
    loss = learner.support_loss(params, 0, task)
    doubled = dict(task, support_weights=2 * task["support_weights"])
    assert learner.support_loss(params, 0, doubled).item() == pytest.approx(2 * loss.item())
    weights = task["support_weights"]
    assert (weights[task["support_mask"] == 0] == 0).all()


# --- training lowers the query loss ---------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("use_adaptive_loss", [False, True])
def test_meta_training_lowers_the_query_loss_on_a_fixed_batch(ratings_file, tmp_path, model,
                                                              use_adaptive_loss):
    args = tiny_args(ratings_file, f"--model={model}", "--bert_dropout=0", "--outer_lr=0.01",
                     f"--use_adaptive_loss={use_adaptive_loss}", f"--log_dir={tmp_path}")
    data = load_data(DataConfig.from_args(args))
    trainer = main.MetaTrainer(args, data, torch.device("cpu"))
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
    tested = main.MetaTrainer(args, data, device)
    tested.load(2, best=True, resume=False)
    tested.learner.eval()
    assert weights == pytest.approx(tested.learner.mean_weight_per_rating(tested.sampler.fixed_tasks("test")))
    untrained = main.MetaTrainer(args, data, device).learner.eval()
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
    ours = run_files.pretrained_embedding_path(args)
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


def test_passes_of_fewer_tasks_give_the_same_outer_step(ratings_file, tmp_path):
    runs = []
    for tasks_per_pass in ("4", "1"):
        args = tiny_args(ratings_file, "--bert_dropout=0", f"--tasks_per_pass={tasks_per_pass}",
                         f"--log_dir={tmp_path}")
        data = load_data(DataConfig.from_args(args))
        torch.manual_seed(0)  # the encoder's initialisation
        trainer = main.MetaTrainer(args, data, torch.device("cpu"))
        metrics = trainer.train_step(trainer.sampler.train_batch(4))
        runs.append((metrics, {name: p.grad for name, p in trainer.learner.named_parameters()
                               if p.grad is not None}))
    (metrics_whole, whole), (metrics_split, split) = runs
    assert metrics_whole["rmse"] == pytest.approx(metrics_split["rmse"], rel=1e-6)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:  # the meta-gradients (float32: the passes sum the tasks in another order)
        torch.testing.assert_close(whole[name], split[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
def test_normalized_weights_have_mean_one_per_task(ratings_file, normalize):
    args, learner, batch = tiny_learner(ratings_file, f"--normalize_weights={normalize}")
    with torch.no_grad():
        task = learner.with_encoder_weights(learner.task_tensors(batch))
    weights, mask = task["support_weights"], task["support_mask"]            # [T, S, L]
    means = (weights * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
    if normalize:
        torch.testing.assert_close(means, torch.ones_like(means))
    else:
        assert not torch.allclose(means, torch.ones_like(means), atol=1e-2)
    assert (weights[mask == 0] == 0).all()


def test_a_run_that_never_beats_the_mean_rating_says_so(ratings_file, tmp_path, capsys):
    run_main(ratings_file, tmp_path, "--num_train_iterations=2", "--log_interval=2", "--inner_lr=1e6",
             "--use_adaptive_loss=False")
    out = capsys.readouterr().out
    assert "warning: the best validation RMSE" in out and "worse than predicting the training mean" in out


# --- controls: what MELO's gain is made of ------------------------------------------------------
def test_a_rating_blind_encoder_gives_the_same_weights_whatever_the_ratings(ratings_file):
    args, learner, batch = tiny_learner(ratings_file, "--rating_blind_encoder=True")
    other = copy_batch(batch)
    other.support_ratings = torch.where(batch.support_items > 0, 6 - batch.support_ratings, batch.support_ratings)
    assert not torch.equal(other.support_ratings, batch.support_ratings)
    with torch.no_grad():
        blind = [learner.with_encoder_weights(learner.task_tensors(b))["support_weights"] for b in (batch, other)]
    assert torch.equal(blind[0], blind[1])
    _, seeing, _ = tiny_learner(ratings_file)
    with torch.no_grad():
        seen = [seeing.with_encoder_weights(seeing.task_tensors(b))["support_weights"] for b in (batch, other)]
    assert not torch.equal(seen[0], seen[1])   # the ordinary encoder reads them


def test_inverse_frequency_weights_have_mean_one_and_weigh_rare_ratings_more():
    from meta_learning.meta_learner import inverse_frequency_weights
    ratings = torch.tensor([[[0.0, 5, 5], [5.0, 5, 1]], [[0.0, 0, 2], [0.0, 3, 3]]])   # [T=2, S=2, L=3]
    mask = (ratings > 0).float()
    weights = inverse_frequency_weights(ratings, mask)
    # task 0: four 5-star and one 1-star positions -> 1/4 and 1/1, scaled to mean 1 over 5 positions
    assert weights[0][ratings[0] == 5].tolist() == pytest.approx([5 / 8] * 4)
    assert weights[0][ratings[0] == 1].item() == pytest.approx(5 / 2)
    assert weights[1][ratings[1] == 2].item() == pytest.approx(1.5) and weights[1][ratings[1] == 3].tolist() == \
        pytest.approx([0.75, 0.75])
    assert (weights[mask == 0] == 0).all()
    for task in range(2):
        assert weights[task][mask[task] > 0].mean().item() == pytest.approx(1.0)


def test_maml_with_inverse_frequency_weights_is_maml_reweighted(ratings_file, tmp_path):
    args = tiny_args(ratings_file, "--use_adaptive_loss=False", "--inverse_frequency_weights=True", "--bert_dropout=0",
                     f"--log_dir={tmp_path}")
    data = load_data(DataConfig.from_args(args))
    trainer = main.MetaTrainer(args, data, torch.device("cpu"))
    assert trainer.method == "maml" and trainer.learner.encoder is None
    batch = trainer.sampler.train_batch(4)
    reweighted = trainer.learner.meta_loss(batch, 0)[0].item()
    plain = main.MetaTrainer(tiny_args(ratings_file, "--use_adaptive_loss=False", "--bert_dropout=0"), data,
                             torch.device("cpu")).learner.meta_loss(batch, 0)[0].item()
    assert math.isfinite(reweighted) and reweighted != pytest.approx(plain, rel=1e-6)


def copy_batch(batch):
    from dataclasses import replace
    return replace(batch)
