"""The meta-gradient of a task batch, eager or compiled (--compile).

Eager: ``MetaLearner.forward`` (the meta-objective) and ``.backward()``.  Compiled: the
same objective as a function of the meta-parameters (``functional_call``), its gradient
taken with ``torch.func.grad`` and the whole of it — the encoder, every inner step with
its second-order terms, the query losses and the outer backward — compiled by
``torch.compile(fullgraph=True)`` into one graph; the gradients are then written to the
parameters' ``.grad`` as ``.backward()`` would, and clipping and the optimisers stay eager.
A graph break would silently run the transform eagerly, so ``fullgraph`` makes it an error.

Shapes the graph is specialised to: the task batch's sizes, and the number of query losses
(every step's while the multi-step loss lasts, then the last one's: two graphs in a run).
The support rows stay whole: cut to each batch's longest sequence (--support_chunks) their
length would change from batch to batch, and each length would be another compilation
(marked dynamic, the graph compiled twice as slowly and still recompiled: measured).
"""
import time

import torch
from torch.func import functional_call, grad
from tqdm import tqdm


class MetaGradient:
    """``meta_gradient(batch, iteration, scale)``: the meta-loss of a TaskBatch at outer
    iteration ``iteration`` and its target predictions [T, Q], detached, with ``scale`` ×
    the meta-gradient added to every meta-parameter's ``.grad``. ``mode``: torch.compile's
    (``"reduce-overhead"``: CUDA graphs on a GPU; benchmarks/device_check.py)."""

    def __init__(self, learner, compile=False, mode=None):
        self.learner = learner
        self.compiled = None
        self.graph_shapes = set()   # the shapes compiled for: a new one compiles a graph
        self.graphs_compiled = 0    # Dynamo's count: more than len(graph_shapes) is a recompilation
        if compile:
            # without deterministic algorithms Inductor's CPU kernels may sum into a gradient
            # from several threads in any order: two calls with one seed were 1e-13 apart on two
            # threads (bit-equal on one); with them a seed repeats a compiled run bit for bit
            torch.use_deterministic_algorithms(True, warn_only=True)
            self.compiled = torch.compile(grad(self._objective, has_aux=True), fullgraph=True, mode=mode)

    def _objective(self, params, task, step_weights):
        loss, predictions = functional_call(self.learner, params, (task, step_weights))
        return loss, (loss, predictions)

    def __call__(self, batch, iteration, scale=1.0):
        learner = self.learner
        task = learner.task_tensors(batch, whole_rows=self.compiled is not None)
        step_weights = learner.query_step_weights(iteration).to(batch.support_ratings)
        if self.compiled is None:
            loss, predictions = learner(task, step_weights)
            (loss * scale).backward()
            return loss.detach(), predictions.detach()
        from torch._dynamo.utils import counters   # here: Dynamo takes seconds to import, and eager runs never need it
        params = {name: p for name, p in learner.named_parameters() if p.requires_grad}
        shapes = (tuple(batch.support_items.shape), tuple(batch.query_items.shape), len(step_weights))
        new_graph = shapes not in self.graph_shapes
        if new_graph:
            tqdm.write(f"Compiling the meta-gradient for {shapes[0][0]} tasks and {len(step_weights)} query "
                       "step(s) into one graph: minutes the first time, seconds once Inductor has it in its "
                       "cache on disk ...")
        started = time.perf_counter()
        graphs_before = counters["stats"]["unique_graphs"]
        gradients, (loss, predictions) = self.compiled({name: p.detach() for name, p in params.items()},
                                                       task, step_weights)
        self.graphs_compiled += counters["stats"]["unique_graphs"] - graphs_before
        if new_graph:
            self.graph_shapes.add(shapes)
            tqdm.write(f"Compiled in {time.perf_counter() - started:.0f} s (graph {len(self.graph_shapes)})")
        for name, p in params.items():
            scaled = gradients[name] * scale
            p.grad = scaled if p.grad is None else p.grad + scaled
        return loss, predictions
