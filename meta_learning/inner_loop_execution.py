"""How the inner loop of a task batch is run; none of it changes what is computed.

- ``over_tasks``: a per-task function over every task at once under ``torch.func.vmap``,
  or task by task in a loop (the two agree: tests/test_meta_training.py).
- ``support_item_chunks`` / ``predict_in_chunks``: the support sequences in groups of similar
  length, each without its all-padding leading columns; exact for the models whose
  predictions at real positions ignore the padding (``models.PADDING_FREE_MODELS``).
- ``recomputed``: an inner step whose graph is not kept; the outer backward builds it
  again (less memory, one forward and backward pass more).
- ``default_support_chunks`` / ``default_recompute_steps``: the settings used when
  --support_chunks / --recompute_inner_steps are not given (README "Performance").
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call, vmap

from models import PADDING_FREE_MODELS

# Where cutting padding is exact, 3 chunks shorten a vmapped step on the CPU (docs/performance.md).
CPU_SUPPORT_CHUNKS = {name: 3 for name in PADDING_FREE_MODELS}


def default_support_chunks(model_name, device, use_vmap):
    """Chunks pay where arithmetic is the cost, a vmapped task batch on the CPU; a GPU step
    and the per-task loop are bound by dispatching ops, which chunks multiply."""
    return CPU_SUPPORT_CHUNKS.get(model_name, 1) if device.type == "cpu" and use_vmap else 1


def default_recompute_steps(device):
    """The first step on the CPU, which keeps BERT4Rec MELO's peak memory under 0.8 GB; none
    on a GPU, whose memory is ample and whose time goes to launching kernels."""
    return 1 if device.type == "cpu" else 0


def over_tasks(function, params, task, shared, use_vmap):
    """``function(params, one task)`` for every task of ``task`` (a dict of [T, ...]), with
    ``params`` shared by the tasks or [T, ...] per task; its outputs (a dict or a tuple of
    tensors) stacked over the tasks.  vmap draws each task's own dropout."""
    if use_vmap:
        return vmap(function, in_dims=(None if shared else 0, 0), randomness="different")(params, task)
    num_tasks = task["support_mask"].shape[0]
    outputs = [function(params if shared else {name: p[t] for name, p in params.items()}, one_task(task, t))
               for t in range(num_tasks)]
    if isinstance(outputs[0], dict):
        return {name: torch.stack([output[name] for output in outputs]) for name in outputs[0]}
    return tuple(torch.stack(parts) for parts in zip(*outputs))


def one_task(task, t):
    """Task ``t`` of a task batch dict, whose values are [T, ...] tensors or tuples of them."""
    return {name: tuple(chunk[t] for chunk in value) if isinstance(value, tuple) else value[t]
            for name, value in task.items()}


def support_item_chunks(items, chunks):
    """Support items [T, S, L], rows sorted longest first, as ``chunks`` groups of rows
    [T, S_c, L_c], each cut to its last L_c columns, L_c the longest real sequence of the
    group in any task (at least 1).  Padding in front of a sequence changes no padding-free
    model's predictions at its real positions (tests/test_models.py), so this is exact; it
    saves the work on padding, two thirds of the support positions on MovieLens-100K."""
    num_rows, length = items.shape[1:]
    longest = (items > 0).sum(-1).amax(dim=0).tolist()  # [S] per row rank, non-increasing
    chunks = min(chunks, num_rows)
    bounds = [num_rows * i // chunks for i in range(chunks + 1)]
    return tuple(items[:, start:stop, length - max(longest[start], 1):]
                 for start, stop in zip(bounds, bounds[1:]))


def predict_in_chunks(model, params, item_chunks, length):
    """The model's predictions [S, L] of one task's support rows given as chunks [S_c, L_c]
    (``support_item_chunks``); the columns cut off get 0, which the mask drops from the loss."""
    return torch.cat([F.pad(functional_call(model, params, (items,)), (length - items.shape[-1], 0))
                      for items in item_chunks])


def recomputed(step_function, params, task, meta_parameters):
    """``step_function(params, task)`` -> the next parameters (a dict), its graph not kept: the
    backward runs it again (``RecomputedInBackward``).  Every tensor that needs a gradient
    goes in as an input: ``params``, the task's support weights when it has them, and the
    ``meta_parameters`` that the step reads (inner rates, loss networks)."""
    names = list(params)
    weights = [task["support_weights"]] if "support_weights" in task else []

    def step_from_tensors(*tensors):
        step_task = dict(task, support_weights=tensors[len(names)]) if weights else task
        return tuple(step_function(dict(zip(names, tensors)), step_task).values())

    return dict(zip(names, RecomputedInBackward.apply(step_from_tensors, *params.values(), *weights,
                                                      *meta_parameters)))


class RecomputedInBackward(torch.autograd.Function):
    """``function(*inputs)`` -> a tuple of tensors, run without keeping its graph; the
    backward pass runs it again with the same random draws and differentiates that run
    once (an inner step's own gradient is part of the run, so the meta-gradient keeps its
    second-order terms; a third order is not available).

    torch.utils.checkpoint does not fit the inner loop: its non-reentrant form uses
    saved-tensor hooks, which torch.func.grad rejects, and its reentrant form does not
    support torch.autograd.grad.  Every tensor that needs a gradient must be an input;
    leaves (parameters) among them may also be read by ``function`` directly.
    """

    @staticmethod
    def forward(ctx, function, *inputs):
        ctx.function = function
        ctx.cuda = any(x.is_cuda for x in inputs)
        ctx.rng_states = (torch.get_rng_state(), torch.cuda.get_rng_state() if ctx.cuda else None)
        ctx.save_for_backward(*inputs)
        return function(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *output_grads):
        cpu_state, cuda_state = ctx.rng_states
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if ctx.cuda else []):
            torch.set_rng_state(cpu_state)
            if ctx.cuda:
                torch.cuda.set_rng_state(cuda_state)
            with torch.enable_grad():
                inputs = [x if x.is_leaf else x.detach().requires_grad_(x.requires_grad)
                          for x in ctx.saved_tensors]
                outputs = ctx.function(*inputs)
        wanted = [x for x in inputs if x.requires_grad]
        gradients = iter(torch.autograd.grad(outputs, wanted, output_grads, allow_unused=True))
        return (None, *(next(gradients) if x.requires_grad else None for x in inputs))
