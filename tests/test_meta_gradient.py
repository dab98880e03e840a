"""--compile: the compiled meta-gradient equals the eager one (meta_gradient.py)."""
import pytest
import torch
from torch._dynamo.utils import counters

from meta_gradient import MetaGradient
from test_meta_training import ratings_file, tiny_learner  # noqa: F401  (a fixture)


def accumulated_gradients(meta_gradient, batch, iteration):
    """The loss, predictions and .grad of every meta-parameter after one call; .grad cleared."""
    loss, predictions = meta_gradient(batch, iteration, scale=0.5)
    parameters = [p for p in meta_gradient.learner.parameters() if p.requires_grad]
    gradients = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]
    for p in parameters:
        p.grad = None
    return loss, predictions, gradients


def test_the_compiled_meta_gradient_is_the_eager_one_in_float64(ratings_file):  # noqa: F811
    # BERT4Rec MELO: the LSTM encoder, attention, LSLR, the multi-step loss; one inner step
    # keeps the cold compilation under a minute on two cores (the benchmark times three)
    args, learner, batch = tiny_learner(ratings_file, "--model=bert4rec", "--bert_dropout=0", "--num_inner_steps=1",
                                        dtype=torch.float64)
    learner.train()
    counters.clear()
    compiled = MetaGradient(learner, compile=True)
    for iteration in (0, 10_000):   # the multi-step loss, then the last step's alone (one weight each)
        eager = accumulated_gradients(MetaGradient(learner), batch, iteration)
        result = accumulated_gradients(compiled, batch, iteration)
        torch.testing.assert_close(result[0], eager[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result[1], eager[1], rtol=1e-9, atol=1e-12)
        for compiled_gradient, eager_gradient in zip(result[2], eager[2]):
            torch.testing.assert_close(compiled_gradient, eager_gradient, rtol=1e-9, atol=1e-12)
        assert any(g.abs().sum() > 0 for g in result[2])
    again = accumulated_gradients(compiled, batch, 10_000)   # the same shapes: no new graph
    torch.testing.assert_close(again[2], result[2], rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
