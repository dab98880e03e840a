"""MAML++ meta-learning with MELO's adaptive weighted loss.

For every task (one user) the recommender's shared initial parameters θ are adapted on
the support set for J inner steps,

    θ_{j+1} = θ_j - α[p, j] · ∂/∂θ_j  Σ w·ℓ(f(support; θ_j), r) / #real positions,

and judged on the query set after each step.  MAML uses w = 1; MELO gets one weight
per support interaction from a task-state encoder that reads the user's ratings.  Each
inner step adapts a whole task batch at once: ``torch.func.vmap`` over a function that
runs the model with ``functional_call`` and takes the inner gradient with
``torch.func.grad``.  Outer gradients flow through the inner updates (second order)
unless first order is asked for.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, grad, vmap

from inner_loop_optimizers import LSLRGradientDescentLearningRule
from models import CPU_SUPPORT_CHUNKS
from options import PADDING_FREE_MODELS
from models.loss_weighting import LossNetwork, TaskInfoMLP, TaskStateEncoder

MAX_RATING = 5.0


def importance_vector(iteration, num_steps, num_multi_step_iterations):
    """MAML++ multi-step loss weights of the J query losses at an outer iteration: the
    non-final steps decay from 1/J to 0.03/J, the final step grows to take the rest."""
    decay = iteration / (num_steps * num_multi_step_iterations)
    floor = 0.03 / num_steps
    weights = [max(1.0 / num_steps - decay, floor)] * (num_steps - 1)
    weights.append(min(1.0 / num_steps + (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor))
    return torch.tensor(weights)


class MetaLearner(nn.Module):
    """The meta-parameters — recommender θ, inner learning rates α and, for MELO, the
    loss-weighting networks — and the adaptation of a task batch with them."""

    def __init__(self, model, args):
        super().__init__()
        self.model = model
        self.num_inner_steps = args.num_inner_steps
        self.support_chunks = args.support_chunks
        self.recompute_steps = args.recompute_inner_steps
        self.cpu_support_chunks = CPU_SUPPORT_CHUNKS.get(args.model, 1)
        # only a model that ignores padding may run on support rows without their padding
        self.cuts_padding = args.model in PADDING_FREE_MODELS
        self.inner_optimizer = LSLRGradientDescentLearningRule(
            dict(model.named_parameters()), num_inner_steps=args.num_inner_steps,
            init_learning_rate=args.inner_lr,
            use_learnable_learning_rates=args.use_learnable_params)
        self.use_focal_loss = args.use_focal_loss
        # predictions are rating / 5; the loss compares them with rating / 5, or in stars
        self.loss_scale = 1.0 if args.normalize_loss else MAX_RATING

        adaptive = args.use_adaptive_loss
        self.method = "melo" if adaptive else "maml"
        # the LSTM encoder takes precedence over the MLP one, as in the reference
        self.encoder = (TaskStateEncoder(args.lstm_input_size, args.lstm_hidden,
                                         args.lstm_num_layers, use_softmax=args.use_softmax)
                        if adaptive and args.use_lstm else None)
        self.task_info_features = [name for name in ("rating_mean", "rating_std", "labels",
                                                     "predictions", "loss")
                                   if getattr(args, f"task_info_{name}")]
        self.normalize_weights = args.normalize_weights
        self.task_info_mlp = (TaskInfoMLP(len(self.task_info_features), use_softmax=args.use_softmax)
                              if adaptive and not args.use_lstm and args.use_mlp else None)
        aggregate = adaptive and (args.use_mlp_mean or (not args.use_lstm and not args.use_mlp))
        self.loss_network = (LossNetwork(args.num_inner_steps, args.max_seq_len,
                                         num_layers=args.loss_num_layers,
                                         use_step_loss=args.use_step_loss)
                             if aggregate else None)

    # --- losses -------------------------------------------------------------------
    def _errors(self, predictions, ratings, focal=False):
        """Per-position loss of predictions (rating / 5) against ratings (stars)."""
        difference = (predictions - ratings / MAX_RATING) * self.loss_scale
        return difference.abs() ** 3 if focal else difference ** 2

    def support_loss(self, params, step, task):
        """The inner-loop loss of one task: Σ w·ℓ / #real positions."""
        ratings, mask = task["support_ratings"], task["support_mask"]
        predictions = self.predict_support(params, task)                 # [S, L]
        losses = self._errors(predictions, ratings, focal=self.use_focal_loss) * mask
        if self.task_info_mlp is not None:
            features = self._task_features(task, predictions, losses)  # [S, L, F]
            losses = losses * self._normalized(self.task_info_mlp(features, mask), mask)
        elif "support_weights" in task:
            losses = losses * task["support_weights"]
        if self.loss_network is not None:
            real_rows = mask[:, -1]
            sequence_losses = self.loss_network(losses, step)            # [S]
            return (sequence_losses * real_rows).sum() / real_rows.sum()
        return losses.sum() / mask.sum()

    def predict_support(self, params, task):
        """Predictions [S, L] of the support sequences, the model run on each chunk of
        rows without its all-padding leading columns (``_support_item_chunks``); the
        columns cut off get 0, which the mask drops from the loss."""
        length = task["support_mask"].shape[-1]
        return torch.cat([F.pad(functional_call(self.model, params, (items,)), (length - items.shape[-1], 0))
                          for items in task["support_item_chunks"]])

    def query_loss(self, params, task):
        """Mean squared error over all real query positions, and the predictions."""
        predictions = functional_call(self.model, params, (task["query_items"],))  # [Q, L]
        mask = task["query_mask"]
        loss = (self._errors(predictions, task["query_ratings"]) * mask).sum() / mask.sum()
        return loss, predictions

    def _task_features(self, task, predictions, losses):
        """Per-position inputs of the MLP encoder, as the reference builds them: the task's
        rating mean and std (on the loss scale), the label / 5, the prediction (rating / 5)
        and the loss (each switched by a task_info_* flag)."""
        columns = {
            "rating_mean": task["rating_stats"][0].expand_as(predictions),
            "rating_std": task["rating_stats"][1].expand_as(predictions),
            "labels": task["support_ratings"] / MAX_RATING,
            "predictions": predictions,
            "loss": losses,
        }
        return torch.stack([columns[name] for name in self.task_info_features], dim=-1)

    # --- adaptation -----------------------------------------------------------------
    def inner_step(self, params, step, task, first_order):
        """θ_{j+1} = θ_j - α[:, j] · ∂/∂θ_j support loss, for one task."""
        gradients = grad(self.support_loss)(params, step, task)
        if first_order:
            gradients = {name: g.detach() for name, g in gradients.items()}
        return self.inner_optimizer.update_params(params, gradients, step)

    def adapt_step(self, params, step, task, first_order, use_vmap, recompute):
        """Inner step ``step`` of every task: θ_j (shared by the tasks at step 0, else
        [T, ...] per task) -> θ_{j+1} [T, ...].  With ``recompute`` the step's graph is
        not kept: the outer backward builds it again (RecomputedInBackward)."""
        shared = step == 0

        def step_all_tasks(params, task):
            return over_tasks(lambda p, t: self.inner_step(p, step, t, first_order), params, task,
                              shared, use_vmap)

        if not recompute:
            return step_all_tasks(params, task)
        # every tensor that needs a gradient goes in as an input: θ_j, the MELO weights,
        # and the meta-parameters that the step reads (rates α, loss networks)
        names = list(params)
        weights = [task["support_weights"]] if "support_weights" in task else []
        meta = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("model.")]

        def step_from_tensors(*tensors):
            step_task = dict(task, support_weights=tensors[len(names)]) if weights else task
            return tuple(step_all_tasks(dict(zip(names, tensors)), step_task).values())

        return dict(zip(names, RecomputedInBackward.apply(step_from_tensors, *params.values(), *weights, *meta)))

    def prepare_tasks(self, batch, support_chunks=1):
        """The batch as a dict of per-task tensors, with what is computed once for the
        whole batch outside the vmapped inner loop (masks, LSTM weights, statistics).
        Each task's support rows are sorted longest first (the loss is a sum over them); for
        a model that ignores padding their items are cut into ``support_chunks`` groups
        without their all-padding columns (``_support_item_chunks``), else kept whole."""
        support_mask = batch.support_mask
        order = support_mask.sum(-1).argsort(dim=1, descending=True, stable=True)  # [T, S]

        def longest_first(rows):  # [T, S, L] -> the same rows in ``order``
            return rows.gather(1, order.unsqueeze(-1).expand_as(rows))

        support_items = longest_first(batch.support_items)
        task = {
            "support_item_chunks": (_support_item_chunks(support_items, support_chunks) if self.cuts_padding
                                    else (support_items,)),
            "support_ratings": longest_first(batch.support_ratings),
            "support_mask": longest_first(support_mask),
            "query_items": batch.query_items,
            "query_ratings": batch.query_ratings,
            "query_mask": batch.query_mask,
        }
        if self.encoder is not None:
            num_tasks, num_support, length = support_mask.shape
            weights = self.encoder(task["support_ratings"].reshape(-1, length),
                                   task["support_mask"].reshape(-1, length))
            task["support_weights"] = self._normalized(weights.reshape(num_tasks, num_support, length),
                                                       task["support_mask"])
        if self.task_info_mlp is not None:
            task["rating_stats"] = self._rating_stats(batch)
        return task

    def default_support_chunks(self, batch, use_vmap):
        """--support_chunks when it is not given: chunks pay where arithmetic is the cost,
        a vmapped task batch on the CPU; a GPU step and the per-task loop are bound by
        dispatching ops, which chunks multiply (README "Performance")."""
        on_cpu = batch.support_items.device.type == "cpu"
        return self.cpu_support_chunks if on_cpu and use_vmap else 1

    def default_recompute_steps(self, batch):
        """--recompute_inner_steps when it is not given: the first step on the CPU, which
        keeps BERT4Rec MELO's peak memory under 0.8 GB; none on a GPU, whose memory is
        ample and whose time goes to launching kernels (README "Performance")."""
        return 1 if batch.support_items.device.type == "cpu" else 0

    def _normalized(self, weights, mask):
        """With --normalize_weights, scale each task's weights [..., S, L] to mean 1 over its
        real positions: the encoder then shifts the loss between interactions, and the
        size of the inner step stays with the learnable rates α."""
        if not self.normalize_weights:
            return weights
        mean = (weights * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum(dim=(-2, -1), keepdim=True)
        return weights / (mean + 1e-8)

    def _rating_stats(self, batch):
        """Per task mean and (unbiased) std of every real support rating, each counted once
        per support sequence it is in, on the loss scale ([T, 2]), as the reference's."""
        mask = batch.support_mask
        ratings = batch.support_ratings / MAX_RATING * self.loss_scale
        count = mask.sum(dim=(1, 2))
        mean = (ratings * mask).sum(dim=(1, 2)) / count
        variance = (((ratings - mean[:, None, None]) * mask) ** 2).sum(dim=(1, 2)) / (count - 1).clamp(min=1)
        return torch.stack([mean, variance.sqrt()], dim=1)

    def forward(self, batch, query_steps, first_order=False, use_vmap=True):
        """Adapt every task of ``batch``: query losses [T, len(query_steps)] after the inner
        steps in ``query_steps``, and the final target predictions [T, Q] in stars.

        The graphs of the first --recompute_inner_steps inner steps are not kept for the
        outer backward, which builds them again: less memory, a forward and backward pass
        more per step.  The last step's graph is the first one the backward needs, so
        rebuilding it would save nothing: at most num_inner_steps - 1 steps count."""
        task = self.prepare_tasks(batch, self.support_chunks or self.default_support_chunks(batch, use_vmap))
        recompute_steps = self.recompute_steps
        if recompute_steps is None:
            recompute_steps = self.default_recompute_steps(batch)
        if first_order or not torch.is_grad_enabled():
            recompute_steps = 0  # no second-order graph to spare
        params = dict(self.model.named_parameters())  # θ_0, shared by the tasks
        query_losses = []
        for step in range(self.num_inner_steps):
            recompute = step < min(recompute_steps, self.num_inner_steps - 1)
            params = self.adapt_step(params, step, task, first_order, use_vmap, recompute)
            if step in query_steps:
                losses, predictions = over_tasks(self.query_loss, params, task, False, use_vmap)
                query_losses.append(losses)
        return torch.stack(query_losses, dim=1), predictions[..., -1] * MAX_RATING

    def mean_weight_per_rating(self, batch):
        """Mean LSTM loss weight of the real support positions of each true rating."""
        if self.encoder is None:
            return {}
        with torch.no_grad():
            task = self.prepare_tasks(batch)
        real = task["support_mask"] > 0
        ratings, weights = task["support_ratings"][real], task["support_weights"][real]
        return {f"{value:g}": weights[ratings == value].mean().item()
                for value in torch.unique(ratings).tolist()}


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


def one_task(task, t):
    """Task ``t`` of a task batch dict, whose values are [T, ...] tensors or tuples of them."""
    return {name: tuple(chunk[t] for chunk in value) if isinstance(value, tuple) else value[t]
            for name, value in task.items()}


def _support_item_chunks(items, chunks):
    """Support items [T, S, L], rows sorted longest first, as ``chunks`` groups of rows
    [T, S_c, L_c], each cut to its last L_c columns, L_c the longest real sequence of the
    group in any task (at least 1).  Padding in front of a sequence changes no model's
    predictions at its real positions (tests/test_models.py), so this is exact; it saves
    the work on padding, two thirds of the support positions on MovieLens-100K."""
    num_rows, length = items.shape[1:]
    longest = (items > 0).sum(-1).amax(dim=0).tolist()  # [S] per row rank, non-increasing
    chunks = min(chunks, num_rows)
    bounds = [num_rows * i // chunks for i in range(chunks + 1)]
    return tuple(items[:, start:stop, length - max(longest[start], 1):]
                 for start, stop in zip(bounds, bounds[1:]))
