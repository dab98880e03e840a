"""The inner loop and outer step of MAML and MELO (meta_learning/meta_learner.py,
inner_loop_execution.py): the multi-step weights, vmap against the per-task loop, support
chunks and recomputed steps, the passes of a batch, and MELO's weights and their controls."""
import math
from dataclasses import replace

import pytest
import torch

from config import DataConfig, MetaRunConfig
from dataloader import load_data
from fixtures import METHOD_FLAGS, tiny_args, tiny_learner
import main
from meta_learning.inner_loop_execution import default_recompute_steps, default_support_chunks, one_task
from meta_learning.meta_learner import importance_vector, inverse_frequency_weights
from options import PADDING_FREE_MODELS, FlagError, parse_args

MODELS = ("bert4rec", "sasrec", "gru4rec", "narm", "ncf")


def outer_step(learner, batch, num_inner_steps, use_vmap=True):
    """Every step's query losses, the target predictions, and the meta-gradient of their
    batch mean (None for a parameter that the step does not reach)."""
    losses, predictions = learner.adapt(learner.task_tensors(batch), range(num_inner_steps), use_vmap=use_vmap)
    gradients = torch.autograd.grad(losses.sum(dim=1).mean(),
                                    [p for p in learner.parameters() if p.requires_grad],
                                    allow_unused=True)
    return losses, predictions, gradients


def assert_same_outer_step(result, expected, rtol, atol, gradient_rtol):
    """Two outer_step results agree: query losses and predictions to ``rtol``/``atol``, every
    meta-gradient to ``gradient_rtol``/``atol``, the same parameters reached, and some moved."""
    (losses, predictions, gradients), (expected_losses, expected_predictions, expected_gradients) = result, expected
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, expected_losses, rtol=rtol, atol=atol)
    torch.testing.assert_close(predictions, expected_predictions, rtol=rtol, atol=atol)
    assert [g is None for g in gradients] == [g is None for g in expected_gradients]
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        if gradient is not None:
            torch.testing.assert_close(gradient, expected_gradient, rtol=gradient_rtol, atol=atol)
    assert sum(g.abs().sum() for g in gradients if g is not None) > 0


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
    vmapped, looped = (outer_step(learner, batch, args.num_inner_steps, use_vmap) for use_vmap in (True, False))
    assert_same_outer_step(vmapped, looped, rtol=1e-9, atol=1e-9, gradient_rtol=1e-5)


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
        results.append(outer_step(learner, batch, args.num_inner_steps))
    assert_same_outer_step(results[1], results[0], rtol=1e-10, atol=1e-12, gradient_rtol=1e-8)


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
    (*kept, next_draw_kept), (*recomputed, next_draw_recomputed) = results
    assert_same_outer_step(recomputed, kept, rtol=1e-12, atol=1e-12, gradient_rtol=1e-9)
    assert next_draw_recomputed == next_draw_kept  # the replay left the random stream where it was


def test_recomputed_steps_keep_no_graph_and_default_to_one_on_the_cpu(ratings_file):
    args, learner, batch = tiny_learner(ratings_file)
    assert args.recompute_inner_steps is None
    assert default_recompute_steps(torch.device("cpu")) == 1 and default_recompute_steps(torch.device("cuda")) == 0
    nodes = []
    for recompute in (0, 1, 2):
        learner.config = replace(learner.config, recompute_inner_steps=recompute)
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


def test_passes_of_fewer_tasks_give_the_same_outer_step(ratings_file, tmp_path):
    runs = []
    for tasks_per_pass in ("4", "1"):
        args = tiny_args(ratings_file, "--bert_dropout=0", f"--tasks_per_pass={tasks_per_pass}",
                         f"--log_dir={tmp_path}")
        data = load_data(DataConfig.from_args(args))
        torch.manual_seed(0)  # the encoder's initialisation
        trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
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
    trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
    assert trainer.method == "maml" and trainer.learner.encoder is None
    batch = trainer.sampler.train_batch(4)
    reweighted = trainer.learner.meta_loss(batch, 0)[0].item()
    plain_args = tiny_args(ratings_file, "--use_adaptive_loss=False", "--bert_dropout=0")
    plain = main.MetaTrainer(MetaRunConfig.from_args(plain_args, data.num_items), data,
                             torch.device("cpu")).learner.meta_loss(batch, 0)[0].item()
    assert math.isfinite(reweighted) and reweighted != pytest.approx(plain, rel=1e-6)


def copy_batch(batch):
    return replace(batch)
