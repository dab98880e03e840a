"""Recommenders and loss-weighting networks: parametrisation, shapes, masking, functional_call,
vmap, second order."""
import math
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call, grad, vmap

from config import ModelConfig
from models import LossNetwork, TaskInfoMLP, TaskStateEncoder, model_factory
from models.layers import Dropout
from models.loss_weighting import rating_ids
from options import MODELS, PADDING_FREE_MODELS, parse_args

PADDING_READING_MODELS = [name for name in MODELS if name not in PADDING_FREE_MODELS]

TINY = ["--max_seq_len=4", "--bert_hidden_units=4", "--bert_num_heads=2",
        "--bert_num_blocks=1", "--narm_hidden_size=3", "--narm_embedding_dim=3",
        "--gru4rec_hidden_size=3", "--gru4rec_embedding_dim=3", "--gru4rec_n_layers=2"]
SMALL = ["--max_seq_len=6", "--bert_hidden_units=8", "--bert_num_heads=2",
         "--bert_num_blocks=2", "--narm_hidden_size=6", "--narm_embedding_dim=5",
         "--gru4rec_hidden_size=6", "--gru4rec_embedding_dim=5"]


def model_config(model, flags=SMALL, num_items=20, **overrides):
    args = parse_args([f"--model={model}", *flags, *(f"--{k}={v}" for k, v in overrides.items())])
    return ModelConfig.from_args(args, num_items)


def build(model, flags=SMALL, num_items=20, dtype=torch.float64, **overrides):
    return model_factory(model_config(model, flags, num_items, **overrides)).to(dtype)


def sequences(num_rows, length, num_items, generator):
    """Left-padded item sequences [num_rows, length]: row 0 all padding, row 1 a single item,
    row 2 no padding, the others a random amount of padding."""
    items = torch.randint(1, num_items + 1, (num_rows, length), generator=generator)
    num_pads = torch.randint(0, length, (num_rows,), generator=generator)
    num_pads[:3] = torch.tensor([length, length - 1, 0])
    return torch.where(torch.arange(length) < num_pads[:, None], 0, items)


def masked_mse(model, params, items, targets):
    real = (items > 0).to(targets.dtype)
    return (((functional_call(model, params, (items,)) - targets) ** 2) * real).sum() / real.sum()


def mse_with_padding(model, params, items, targets):  # padded positions count too
    return ((functional_call(model, params, (items,)) - targets) ** 2).mean()


def query_loss(model, params, support, support_targets, query, query_targets, loss=masked_mse):
    """Query loss after one inner gradient step on the support set (second order kept)."""
    grads = grad(lambda p: loss(model, p, support, support_targets))(params)
    adapted = {name: p - 0.5 * grads[name] for name, p in params.items()}
    return loss(model, adapted, query, query_targets)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_output_shape_range_and_no_nan(name, train):
    model = build(name, dtype=torch.float32).train(train)
    items = sequences(8, 6, 20, torch.Generator().manual_seed(0))
    items[3, -1] = 20  # the largest item id
    out = model(items)
    assert out.shape == (8, 6) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if name != "ncf":  # the reference's NCF is linear, its output not squashed
        assert ((out > 0.1) & (out < 1.1)).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- parametrisation: as the reference starts its models ------------------------------

def xavier_std(weight):
    """Standard deviation of xavier_uniform_ on a [fan_out, fan_in] tensor."""
    fan_out, fan_in = weight.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("name", MODELS)
def test_parameters_start_as_the_references(name):
    """xavier_uniform_ on every linear weight and embedding, zero biases, N(0, 1) initial
    GRU states, LayerNorm at the identity."""
    model = build(name, flags=[], num_items=600, dtype=torch.float32)  # ML-100K's scale
    items = model.embedding.items.weight
    assert abs(items.std().item() / xavier_std(items) - 1) < 0.1
    assert abs(items.std().item() - 0.056) < 0.003  # 601 ids x 32: PyTorch's default would be 1
    for key, p in model.named_parameters():
        if key.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), key
        elif key.endswith("initial_states"):
            assert 0.6 < p.std().item() < 1.5 and p.abs().max() > 1.0, key  # N(0, 1), 32 or 64 draws
        elif key.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), key
        else:
            bound = math.sqrt(3) * xavier_std(p)
            assert p.abs().max() <= bound, key
            if p.numel() >= 30:
                assert p.abs().max() > 0.8 * bound, key
            if p.numel() >= 500:
                assert abs(p.std().item() / xavier_std(p) - 1) < 0.1, key


def test_dropout_sites_and_layers_are_the_references():
    block = build("bert4rec").blocks[0]
    assert isinstance(block.attn.dropout, Dropout)  # on the attention probabilities
    assert [type(m).__name__ for m in block.ffn] == ["Linear", "GELU", "Dropout", "Linear"]
    assert block.ffn[1].approximate == "tanh"
    for name in ("gru4rec", "narm"):
        model = build(name)
        assert not any(isinstance(m, Dropout) for m in model.gru.modules()), "no dropout between GRU layers"
        assert model.project.weight.shape == (6, 6)  # the reference's Linear(hidden, hidden) after the GRU
    ncf = build("ncf", bert_hidden_units=32)
    assert [layer.out_features for layer in ncf.tower] == [16, 8, 4, 2, 1]


def test_encoder_starts_as_the_references():
    torch.manual_seed(0)
    encoder = TaskStateEncoder(input_size=16, hidden=32, num_layers=1)
    assert abs(encoder.rating_embedding.weight.std().item() - 1) < 0.15  # nn.Embedding: N(0, 1)
    assert encoder.rating_embedding.weight[0].abs().min() > 0  # padding is a learned row
    for state in (encoder.initial_hidden, encoder.initial_cell):
        assert state.shape == (1, 32) and 0.6 < state.std().item() < 1.5


def test_factory_rejects_unknown_model_and_missing_items():
    with pytest.raises(ValueError, match="sasrec, bert4rec, narm, gru4rec, ncf"):
        model_factory(replace(model_config("bert4rec"), model="transformerxl"))
    with pytest.raises(ValueError, match="num_items"):
        model_factory(model_config("narm", num_items=0))


@pytest.mark.parametrize("name", MODELS)
def test_factory_is_seeded_and_leaves_the_rng_alone(name):
    config = model_config(name)
    rng = torch.get_rng_state()
    first, second = model_factory(config), model_factory(config)
    assert torch.equal(torch.get_rng_state(), rng)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    other = model_factory(replace(config, model_init_seed=config.model_init_seed + 1))
    last = [key for key in first.state_dict() if key.endswith("weight")][-1]  # biases start at 0
    assert not torch.equal(first.state_dict()[last], other.state_dict()[last])


@pytest.mark.parametrize("name", MODELS)
def test_embedding_saves_and_loads_on_its_own(name):
    source, target = build(name), build(name, model_init_seed=7)
    assert source.embedding.items.weight.shape[0] == 21  # ids 0..20
    target.embedding.load_state_dict(source.embedding.state_dict())
    for key, value in source.embedding.state_dict().items():
        assert torch.equal(target.embedding.state_dict()[key], value)
    last = [key for key in source.state_dict() if key.endswith("weight")][-1]  # biases start at 0
    assert not torch.equal(source.state_dict()[last], target.state_dict()[last])
    expected = {"items.weight", "positions.weight"} if name in ("sasrec", "bert4rec", "ncf") else {"items.weight"}
    assert set(source.embedding.state_dict()) == expected


def test_sasrec_is_causal():
    model = build("sasrec").eval()
    items = torch.tensor([[0, 0, 0, 3, 4, 5], [0, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    for t in (3, 4, 5):
        changed = items.clone()
        changed[:, t] = items[:, t] % 20 + 1
        before, after = model(items), model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
        assert (after[:, t] - before[:, t]).abs().min() > 1e-6


def perturbed_padding(model, items):
    """Predictions with the padding row of the item embedding and the positions of the
    first two columns moved, next to the predictions as the model is."""
    params = dict(model.named_parameters())
    table = params["embedding.items.weight"]
    perturbed = {**params, "embedding.items.weight": torch.cat([table[:1] + 1.0, table[1:]])}
    if "embedding.positions.weight" in params:
        positions = params["embedding.positions.weight"]
        noise = torch.randn(2, positions.shape[1], dtype=positions.dtype, generator=torch.Generator().manual_seed(0))
        perturbed["embedding.positions.weight"] = torch.cat([positions[:2] + noise, positions[2:]])
    return functional_call(model, perturbed, (items,)), model(items)


@pytest.mark.parametrize("name", PADDING_FREE_MODELS)
def test_bert4rec_and_ncf_ignore_what_sits_at_padded_positions(name):
    model = build(name).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 7, 8, 9, 10], [0, 0, 0, 0, 0, 0]])
    moved, before = perturbed_padding(model, items)
    torch.testing.assert_close(moved[:2, 2:], before[:2, 2:], rtol=0, atol=1e-12)
    assert (moved[:, :2] - before[:, :2]).abs().max() > 1e-4  # the padded positions themselves did move
    assert torch.isfinite(moved).all()


@pytest.mark.parametrize("name", PADDING_READING_MODELS)
def test_sasrec_and_the_grus_read_the_padding_row(name):
    """As in the reference: SASRec attends to padded keys, the GRUs run over padding, so the
    learned padding row changes the predictions at the real positions after it."""
    model = build(name).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 7, 8, 9, 10]])
    moved, before = perturbed_padding(model, items)
    assert (moved[:, 2:] - before[:, 2:]).abs().min() > 1e-8


def test_bert4rec_is_bidirectional():
    model = build("bert4rec").eval()
    items = torch.tensor([[0, 2, 3, 4, 5, 6]])
    changed = items.clone()
    changed[0, 5] = 11
    assert (model(changed)[0, 1:5] - model(items)[0, 1:5]).abs().min() > 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_functional_call_reproduces_the_module(name):
    model = build(name, dtype=torch.float32).eval()
    items = sequences(8, 6, 20, torch.Generator().manual_seed(2))
    assert torch.equal(functional_call(model, dict(model.named_parameters()), (items,)), model(items))


@pytest.mark.parametrize("name", MODELS)
def test_second_order_meta_gradient_passes_gradcheck(name):
    model = build(name, flags=TINY, num_items=6).eval()
    names = [n for n, _ in model.named_parameters()]
    initial = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    support = torch.tensor([[0, 0, 1, 2], [0, 3, 4, 5], [1, 2, 3, 6]])
    query = torch.tensor([[0, 2, 5, 6], [4, 1, 3, 2]])
    support_targets = torch.rand(3, 4, dtype=torch.float64, generator=g)
    query_targets = torch.rand(2, 4, dtype=torch.float64, generator=g)

    def meta_loss(*flat):
        return query_loss(model, dict(zip(names, flat)), support, support_targets, query, query_targets)

    assert torch.autograd.gradcheck(meta_loss, initial)

    def first_order_meta_loss(*flat):  # the inner gradient detached: gradcheck must notice
        params = dict(zip(names, flat))
        grads = grad(lambda p: masked_mse(model, p, support, support_targets))(params)
        adapted = {n: p - 0.5 * grads[n].detach() for n, p in params.items()}
        return masked_mse(model, adapted, query, query_targets)

    assert not torch.autograd.gradcheck(first_order_meta_loss, initial, fast_mode=True, raise_exception=False)


def task_batch(num_tasks=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    support = torch.stack([sequences(5, 6, 20, g) for _ in range(num_tasks)])  # [T, 5, 6]
    query = torch.stack([sequences(5, 6, 20, g)[2:] for _ in range(num_tasks)])  # [T, 3, 6], no all-padding row
    return (support, torch.rand(support.shape, dtype=torch.float64, generator=g),
            query, torch.rand(query.shape, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("loss", [masked_mse, mse_with_padding])  # the latter moves the padding row
def test_vmap_matches_loop_including_meta_gradient(name, loss):
    model = build(name).eval()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    tasks = task_batch()

    def task_loss(p, *task):
        return query_loss(model, p, *task, loss=loss)

    vmapped = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *tasks)  # [T]
    looped = torch.stack([task_loss(params, *(x[i] for x in tasks)) for i in range(3)])
    torch.testing.assert_close(vmapped, looped, rtol=1e-9, atol=1e-12)
    vmapped_grads = torch.autograd.grad(vmapped.sum(), list(params.values()))
    looped_grads = torch.autograd.grad(looped.sum(), list(params.values()))
    for n, a, b in zip(params, vmapped_grads, looped_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=n)
    assert max(g.abs().max() for g in looped_grads) > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_vmap_over_batched_params_matches_loop(name):
    model = build(name).eval()
    g = torch.Generator().manual_seed(4)
    params = {n: p.detach() + 0.1 * torch.randn((3, *p.shape), dtype=p.dtype, generator=g)
              for n, p in model.named_parameters()}  # one parameter set per task
    support = task_batch()[0]
    vmapped = vmap(lambda p, items: functional_call(model, p, (items,)))(params, support)
    looped = torch.stack([functional_call(model, {n: p[i] for n, p in params.items()}, (support[i],))
                          for i in range(3)])
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-12)
    assert (looped[0] - looped[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_dropout_under_vmap_differs_per_task(name):
    model = build(name, dtype=torch.float32, bert_dropout=0.5).train()
    params = dict(model.named_parameters())
    items = sequences(4, 6, 20, torch.Generator().manual_seed(5))[2:].expand(3, -1, -1)  # same items, 3 tasks

    def predict(items):
        return functional_call(model, params, (items,))

    different = vmap(predict, randomness="different")(items)
    same = vmap(predict, randomness="same")(items)
    assert (different[0] - different[1]).abs().max() > 1e-4
    assert (different[1] - different[2]).abs().max() > 1e-4
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


# --- loss weighting -------------------------------------------------------------------

RATINGS = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 4.0],
                        [0.0, 0.0, 5.0, 1.0, 3.0],
                        [0.5, 4.5, 2.0, 2.5, 5.0]])
MASK = (RATINGS > 0).float()


def test_half_stars_get_distinct_ids():
    stars = torch.arange(0, 11) / 2  # 0 (padding), 0.5, 1, ..., 5
    assert torch.equal(rating_ids(stars), torch.arange(0, 11))


def test_encoder_sees_ratings_only():
    torch.manual_seed(0)
    encoder = TaskStateEncoder(input_size=4, hidden=6, num_layers=2)
    weights = encoder(RATINGS, MASK)
    changed = RATINGS.clone()
    changed[3, 1] = 4.0  # a half star to the whole star next to it
    moved = encoder(changed, MASK)
    torch.testing.assert_close(moved[3, :1], weights[3, :1])
    assert (moved[3, 1:] - weights[3, 1:]).abs().min() > 0
    torch.testing.assert_close(moved[:3], weights[:3])


@pytest.mark.parametrize("use_softmax", [False, True])
def test_encoder_weights_are_zero_at_padding(use_softmax):
    torch.manual_seed(0)
    encoder = TaskStateEncoder(input_size=4, hidden=6, num_layers=1, use_softmax=use_softmax)
    weights = encoder(RATINGS, MASK)
    assert weights.shape == RATINGS.shape and torch.isfinite(weights).all()
    assert torch.equal(weights[MASK == 0], torch.zeros(int((MASK == 0).sum())))
    assert (weights[MASK > 0] > 0).all()
    if use_softmax:
        torch.testing.assert_close(weights.sum(-1), torch.tensor([0.0, 1.0, 1.0, 1.0]))


def test_padded_positions_never_reach_the_weighted_loss():
    torch.manual_seed(0)
    encoder = TaskStateEncoder(input_size=4, hidden=6, num_layers=1)
    position_losses = torch.rand(RATINGS.shape, requires_grad=True)
    weighted = (encoder(RATINGS, MASK) * position_losses).sum()
    garbage = position_losses.detach() + 100 * (1 - MASK)
    torch.testing.assert_close((encoder(RATINGS, MASK) * garbage).sum(), weighted)
    weighted.backward()
    assert torch.equal(position_losses.grad[MASK == 0], torch.zeros(int((MASK == 0).sum())))
    for name, p in encoder.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert encoder.initial_hidden.grad.abs().sum() > 0 and encoder.initial_cell.grad.abs().sum() > 0


@pytest.mark.parametrize("use_softmax", [False, True])
def test_task_info_mlp_masks_and_runs_under_vmap(use_softmax):
    torch.manual_seed(0)
    mlp = TaskInfoMLP(num_features=5, use_softmax=use_softmax)
    features = torch.randn(3, 4, 5, 5)  # [T, S, L, F]
    mask = MASK.expand(3, -1, -1)
    weights = vmap(mlp)(features, mask)
    assert weights.shape == (3, 4, 5)
    torch.testing.assert_close(weights, torch.stack([mlp(features[i], mask[i]) for i in range(3)]))
    assert torch.equal(weights * (1 - mask), torch.zeros_like(weights))
    assert (weights[mask > 0] > 0).all()


def test_loss_network_per_step_or_shared():
    torch.manual_seed(0)
    per_step = LossNetwork(num_inner_steps=3, max_seq_len=5, num_layers=2)
    shared = LossNetwork(num_inner_steps=3, max_seq_len=5, num_layers=1, use_step_loss=False)
    assert len(per_step.networks) == 3 and len(shared.networks) == 1
    assert [type(m).__name__ for m in per_step.networks[0]] == ["Linear", "ReLU", "Linear"]
    losses = torch.rand(3, 4, 5)  # [T, S, L]
    per_sequence = vmap(per_step, in_dims=(0, None))(losses, 1)
    assert per_sequence.shape == (3, 4)
    torch.testing.assert_close(per_sequence, per_step.networks[1](losses).squeeze(-1))
    assert (per_step(losses, 0) - per_step(losses, 1)).abs().max() > 1e-4
    torch.testing.assert_close(shared(losses, 0), shared(losses, 2))
