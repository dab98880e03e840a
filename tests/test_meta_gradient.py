"""--compile: the compiled meta-gradient equals the eager one (meta_learning/meta_gradient.py)."""
import pytest
import torch
from torch._dynamo.utils import counters

from fixtures import METHOD_FLAGS, tiny_learner
from meta_learning.meta_gradient import MetaGradient

pytestmark = pytest.mark.compile   # every test here compiles


def accumulated_gradients(meta_gradient, batch, iteration):
    """The loss, predictions and .grad of every meta-parameter after one call; .grad cleared."""
    loss, predictions = meta_gradient(batch, iteration, scale=0.5)
    parameters = [p for p in meta_gradient.learner.parameters() if p.requires_grad]
    gradients = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]
    for p in parameters:
        p.grad = None
    return loss, predictions, gradients


# BERT4Rec MELO: the LSTM encoder, attention, LSLR, the multi-step loss; SASRec MAML: causal
# attention over padded keys; NCF MELO with the MLP encoder and the loss network, and two inner
# steps, the first of which the eager step recomputes in its backward and the graph does not.
# One inner step keeps each transformer's cold compilation near a minute on two cores (the
# benchmark times three).
@pytest.mark.parametrize("model, method, inner_steps", [("bert4rec", "melo", 1), ("sasrec", "maml", 1),
                                                        ("ncf", "melo-mlp", 2)])
def test_the_compiled_meta_gradient_is_the_eager_one_in_float64(ratings_file, model, method,
                                                                inner_steps):
    args, learner, batch = tiny_learner(ratings_file, f"--model={model}", "--bert_dropout=0",
                                        f"--num_inner_steps={inner_steps}", "--recompute_inner_steps=1",
                                        *METHOD_FLAGS[method], dtype=torch.float64)
    learner.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = MetaGradient(learner, compile=True)
    for iteration in (0, 10_000):   # the multi-step loss, then the last step's alone (one weight each)
        eager = accumulated_gradients(MetaGradient(learner), batch, iteration)
        result = accumulated_gradients(compiled, batch, iteration)
        torch.testing.assert_close(result[0], eager[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result[1], eager[1], rtol=1e-9, atol=1e-12)
        for compiled_gradient, eager_gradient in zip(result[2], eager[2]):
            # atol: a key bias's gradient is 0 in exact arithmetic (softmax ignores it), ~1e-18 here
            torch.testing.assert_close(compiled_gradient, eager_gradient, rtol=1e-9, atol=1e-12)
        assert any(g.abs().sum() > 0 for g in result[2])
    again = accumulated_gradients(compiled, batch, 10_000)   # the same shapes: no new graph
    torch.testing.assert_close(again[2], result[2], rtol=0, atol=0)
    # a graph per number of query losses: the multi-step loss's (inner_steps), then the last step's
    shapes = (tuple(batch.support_items.shape), tuple(batch.query_items.shape))
    assert compiled.graph_shapes == {(*shapes, inner_steps), (*shapes, 1)}
    assert counters["stats"]["unique_graphs"] == compiled.graphs_compiled == len(compiled.graph_shapes)
    assert not counters["graph_break"]


# BERT4Rec MELO, one inner step, four tasks, the default dropout: the graph of the compiled run in
# test_meta_training's resume test, which then finds it in Inductor's cache
def test_each_task_draws_its_own_dropout_masks_in_the_compiled_graph(ratings_file):
    args, learner, batch = tiny_learner(ratings_file, "--model=bert4rec", "--num_inner_steps=1")
    learner.train()
    same_task = batch[torch.zeros(4, dtype=torch.long)]        # one task four times
    compiled = MetaGradient(learner, compile=True)
    torch.manual_seed(0)
    loss, predictions, gradients = accumulated_gradients(compiled, same_task, 0)
    assert all(not torch.equal(predictions[0], other) for other in predictions[1:])
    torch.manual_seed(0)                                        # the masks come from torch's generator
    again = accumulated_gradients(compiled, same_task, 0)
    torch.testing.assert_close(again[1], predictions, rtol=0, atol=0)
    torch.testing.assert_close(again[2], gradients, rtol=0, atol=0)
