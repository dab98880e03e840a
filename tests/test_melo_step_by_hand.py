"""One MELO inner step computed by hand on a model small enough to write out: each item's
prediction is a single score, so the weighted support loss, its gradient and the LSLR update
are a few lines of arithmetic (float64, to 1e-12)."""
import pytest
import torch
from torch import nn

from config import MethodConfig
from meta_learning.meta_learner import MetaLearner
from options import parse_args


class ItemScores(nn.Module):
    """The prediction (rating / 5) of item i at any position: its score s_i."""

    def __init__(self, scores):
        super().__init__()
        self.scores = nn.Parameter(torch.tensor(scores, dtype=torch.float64))

    def forward(self, items):  # [..., L] -> [..., L]
        return self.scores[items]


SCORES = [0.5, 0.9, 0.2, 0.6]                                   # item 0 is padding
ITEMS = torch.tensor([[1, 2, 3], [0, 2, 1]])                    # [S, L]: two support rows
RATINGS = torch.tensor([[5.0, 1.0, 4.0], [0.0, 2.0, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([[2.0, 0.5, 1.0], [7.0, 3.0, 1.5]], dtype=torch.float64)   # 7.0 at padding: dropped
RATES = [0.3, 0.7]                                              # the LSLR rates of `scores`, steps 0 and 1


def by_hand(scores, step):
    """s_i - α[step] · ∂/∂s_i Σ_real w (s_item - r/5)² / #real, written out position by position."""
    real = [(s, l) for s in range(2) for l in range(3) if MASK[s, l] == 1]
    gradient = [0.0] * len(scores)
    for s, l in real:
        item = int(ITEMS[s, l])
        gradient[item] += 2 * float(WEIGHTS[s, l]) * (scores[item] - float(RATINGS[s, l]) / 5) / len(real)
    return [score - RATES[step] * g for score, g in zip(scores, gradient)]


@pytest.fixture
def learner():
    args = parse_args(["--model=gru4rec", "--num_inner_steps=2", "--inner_lr=0.3"])   # MELO, the LSTM encoder
    learner = MetaLearner(ItemScores(SCORES), MethodConfig.from_args(args)).double()
    with torch.no_grad():
        learner.inner_optimizer.rates["scores"].copy_(torch.tensor(RATES, dtype=torch.float64))
    return learner


def task():
    return {"support_item_chunks": (ITEMS,), "support_ratings": RATINGS, "support_mask": MASK,
            "support_weights": WEIGHTS}


def test_a_melo_inner_step_is_the_weighted_loss_gradient_times_the_step_rate(learner):
    params = dict(learner.model.named_parameters())
    first = learner.inner_step(params, 0, task(), first_order=False)
    expected_first = by_hand(SCORES, 0)
    assert first["scores"].tolist() == pytest.approx(expected_first, abs=1e-12, rel=0)
    second = learner.inner_step(first, 1, task(), first_order=False)
    assert second["scores"].tolist() == pytest.approx(by_hand(expected_first, 1), abs=1e-12, rel=0)
    # the numbers themselves, for a reader: item 2 is rated 1 and 2 stars with weights 0.5 and 3
    assert expected_first[2] == pytest.approx(0.2 - 0.3 * 2 * (0.5 * (0.2 - 0.2) + 3.0 * (0.2 - 0.4)) / 5, abs=1e-15)


def test_the_weights_scale_the_step_like_the_rate(learner):
    """Doubling every weight moves the scores as doubling the rate does: what makes an encoder
    that gives every rating one weight a learned step size."""
    params = dict(learner.model.named_parameters())
    doubled = dict(task(), support_weights=2 * WEIGHTS)
    with_doubled_weights = learner.inner_step(params, 0, doubled, first_order=False)["scores"]
    with torch.no_grad():
        learner.inner_optimizer.rates["scores"].mul_(2)
    with_doubled_rate = learner.inner_step(params, 0, task(), first_order=False)["scores"]
    torch.testing.assert_close(with_doubled_weights, with_doubled_rate, rtol=0, atol=1e-15)


def test_the_encoder_gives_the_weights_that_the_step_reads(learner):
    batch = {"support_ratings": RATINGS[None], "support_mask": MASK[None]}       # one task: [T, S, L]
    weights = learner.with_encoder_weights(batch)["support_weights"][0]
    torch.testing.assert_close(weights, learner.encoder(RATINGS, MASK), rtol=0, atol=0)
    assert (weights[MASK == 0] == 0).all() and (weights[MASK == 1] > 0).all()


QUERY_ITEMS = torch.tensor([[1, 3, 2]])                                    # [Q, L]: one query row
QUERY_RATINGS = torch.tensor([[4.0, 2.0, 3.0]], dtype=torch.float64)


@pytest.mark.parametrize("first_order", [False, True])
def test_the_second_order_term_is_the_support_hessian_times_the_query_gradient(first_order):
    """MAML, one inner step, through the vmapped inner loop: the meta-gradient of the query loss
    at s' = s - α ∇L_s(s) is (1 - α H) ∇L_q(s'), H the support loss's Hessian, diagonal here
    (H_ii = Σ over item i's real support positions of 2 / #real); first order drops α H."""
    args = parse_args(["--model=gru4rec", "--num_inner_steps=1", "--use_adaptive_loss=False"])
    learner = MetaLearner(ItemScores(SCORES), MethodConfig.from_args(args)).double()
    with torch.no_grad():
        learner.inner_optimizer.rates["scores"].fill_(RATES[0])
    batch = {"support_item_chunks": (ITEMS[None],), "support_ratings": RATINGS[None], "support_mask": MASK[None],
             "query_items": QUERY_ITEMS[None], "query_ratings": QUERY_RATINGS[None],
             "query_mask": torch.ones_like(QUERY_RATINGS)[None]}
    losses, _ = learner.adapt(batch, (0,), first_order=first_order)
    meta_gradient = torch.autograd.grad(losses.sum(), learner.model.scores)[0].tolist()

    real = [(s, l) for s in range(2) for l in range(3) if MASK[s, l] == 1]
    gradient, hessian = [0.0] * 4, [0.0] * 4
    for s, l in real:
        item = int(ITEMS[s, l])
        gradient[item] += 2 * (SCORES[item] - float(RATINGS[s, l]) / 5) / len(real)
        hessian[item] += 2 / len(real)
    adapted = [score - RATES[0] * g for score, g in zip(SCORES, gradient)]
    query_gradient = [0.0] * 4
    for l in range(3):
        item = int(QUERY_ITEMS[0, l])
        query_gradient[item] += 2 * (adapted[item] - float(QUERY_RATINGS[0, l]) / 5) / 3
    expected = [q * (1 if first_order else 1 - RATES[0] * h) for q, h in zip(query_gradient, hessian)]
    assert meta_gradient == pytest.approx(expected, abs=1e-12, rel=0)
    assert losses.item() == pytest.approx(sum((adapted[int(i)] - float(r) / 5) ** 2
                                              for i, r in zip(QUERY_ITEMS[0], QUERY_RATINGS[0])) / 3, abs=1e-12)
    if not first_order:   # the second-order term itself: -α H ∇L_q(s'), item 2's 0.3 · 0.8 · its query gradient
        assert meta_gradient[2] - query_gradient[2] == pytest.approx(-0.3 * 0.8 * query_gradient[2], abs=1e-12)
