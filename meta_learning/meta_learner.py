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

The method reads top to bottom in ``MetaLearner``: ``support_loss`` (with ``support_weights``),
``inner_step``, ``query_loss``, ``adapt`` (the inner loop) and ``forward`` (the outer
objective: MAML++'s importance-weighted query losses).  How a task batch is run (vmap,
support chunks, recomputed steps) is in meta_learning/inner_loop_execution.py.
"""
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad

from inner_loop_optimizers import LSLRGradientDescentLearningRule
from meta_learning.inner_loop_execution import (default_recompute_steps, default_support_chunks, over_tasks,
                                                predict_in_chunks, recomputed, support_item_chunks)
from meta_learning.rating_loss import MAX_RATING, loss_scale, rating_errors
from models import PADDING_FREE_MODELS
from models.loss_weighting import LossNetwork, TaskInfoMLP, TaskStateEncoder


def importance_vector(iteration, num_steps, num_multi_step_iterations):
    """MAML++ multi-step loss weights of the J query losses at an outer iteration: the
    non-final steps decay from 1/J to 0.03/J, the final step grows to take the rest."""
    decay = iteration / (num_steps * num_multi_step_iterations)
    floor = 0.03 / num_steps
    weights = [max(1.0 / num_steps - decay, floor)] * (num_steps - 1)
    weights.append(min(1.0 / num_steps + (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor))
    return torch.tensor(weights)


BLIND_RATING = 3.0  # what a rating-blind encoder reads at every real position (a control)


def inverse_frequency_weights(ratings, mask):
    """Each real support position's weight [T, S, L]: 1 / the number of real positions of its
    task with its rating, scaled to mean 1 over the task's real positions (a control: the
    simplest remedy for imbalance, nothing learned)."""
    counts = torch.zeros_like(ratings)
    for value in torch.unique(ratings[mask > 0]):
        same = (ratings == value) * mask                                   # [T, S, L]
        counts += same * same.sum(dim=(1, 2), keepdim=True)
    weights = mask / counts.clamp(min=1)
    mean = weights.sum(dim=(1, 2), keepdim=True) / mask.sum(dim=(1, 2), keepdim=True)
    return weights / mean


class MetaLearner(nn.Module):
    """The meta-parameters — recommender θ, inner learning rates α and, for MELO, the
    loss-weighting networks — and the adaptation of a task batch with them."""

    def __init__(self, model, config):
        """``model``: the recommender, θ its parameters; ``config``: a config.MethodConfig."""
        super().__init__()
        self.model = model
        self.config = config
        self.inner_optimizer = LSLRGradientDescentLearningRule(
            dict(model.named_parameters()), num_inner_steps=config.num_inner_steps,
            init_learning_rate=config.inner_lr, use_learnable_learning_rates=config.use_learnable_params)
        self.loss_scale = loss_scale(config.normalize_loss)
        # MELO's networks: one task-state encoder (LSTM or MLP) and / or the loss network
        self.encoder = (TaskStateEncoder(config.lstm_input_size, config.lstm_hidden, config.lstm_num_layers,
                                         use_softmax=config.use_softmax)
                        if config.weighting == "lstm" else None)
        self.task_info_mlp = (TaskInfoMLP(len(config.task_info_features), use_softmax=config.use_softmax)
                              if config.weighting == "mlp" else None)
        self.loss_network = (LossNetwork(config.num_inner_steps, config.max_seq_len, num_layers=config.loss_num_layers,
                                         use_step_loss=config.use_step_loss)
                             if config.use_loss_network else None)

    @property
    def method(self):
        return self.config.method

    # --- the method ---------------------------------------------------------------------
    def support_loss(self, params, step, task):
        """The inner-loop loss of one task: Σ w·ℓ / #real positions, or with the loss
        network its per-sequence losses averaged over the real sequences."""
        ratings, mask = task["support_ratings"], task["support_mask"]                  # [S, L]
        predictions = predict_in_chunks(self.model, params, task["support_item_chunks"], mask.shape[-1])
        losses = rating_errors(predictions, ratings, self.loss_scale, focal=self.config.use_focal_loss) * mask
        losses = losses * self.support_weights(task, predictions, losses)
        if self.loss_network is not None:
            real_rows = mask[:, -1]
            sequence_losses = self.loss_network(losses, step)                          # [S]
            return (sequence_losses * real_rows).sum() / real_rows.sum()
        return losses.sum() / mask.sum()

    def support_weights(self, task, predictions, losses):
        """MELO's weight w of every support position [S, L]: from the LSTM encoder (computed
        once per task in ``prepare_tasks``) or from the MLP encoder, which reads this step's
        predictions and losses; 1 for MAML."""
        if self.task_info_mlp is not None:
            features = self._task_features(task, predictions, losses)                  # [S, L, F]
            return self._normalized(self.task_info_mlp(features, task["support_mask"]), task["support_mask"])
        if "support_weights" in task:   # the LSTM encoder's, or MAML's inverse-frequency control
            return task["support_weights"]
        return 1.0

    def inner_step(self, params, step, task, first_order):
        """θ_{j+1} = θ_j - α[:, j] · ∂/∂θ_j support loss, for one task."""
        gradients = grad(self.support_loss)(params, step, task)
        if first_order:
            gradients = {name: g.detach() for name, g in gradients.items()}
        return self.inner_optimizer.update_params(params, gradients, step)

    def adapt_step(self, params, task, step, first_order, use_vmap):
        """Inner step ``step`` of every task: θ_j (shared by the tasks at step 0, else
        [T, ...] per task) -> θ_{j+1} [T, ...]."""
        return over_tasks(lambda p, t: self.inner_step(p, step, t, first_order), params, task, step == 0, use_vmap)

    def query_loss(self, params, task):
        """Mean squared error over all real query positions, and the predictions."""
        predictions = functional_call(self.model, params, (task["query_items"],))     # [Q, L]
        mask = task["query_mask"]
        loss = (rating_errors(predictions, task["query_ratings"], self.loss_scale) * mask).sum() / mask.sum()
        return loss, predictions

    def adapt(self, task, query_steps, first_order=False, use_vmap=True):
        """The inner loop of every task of ``task`` (``task_tensors``): query losses
        [T, len(query_steps)] after the inner steps in ``query_steps``, and the final target
        predictions [T, Q] in stars.

        The graphs of the first --recompute_inner_steps inner steps are not kept for the
        outer backward, which builds them again (the same meta-gradient in less memory).
        The last step's graph is the first one the backward needs, so rebuilding it would
        save nothing: at most num_inner_steps - 1 steps count."""
        task = self.with_encoder_weights(task)
        recompute_steps = self.config.recompute_inner_steps
        if recompute_steps is None:
            recompute_steps = default_recompute_steps(task["support_mask"].device)
        if first_order or not torch.is_grad_enabled():
            recompute_steps = 0  # no second-order graph to spare
        if torch.compiler.is_compiling():
            recompute_steps = 0  # recomputing does not trace; a compiled graph plans its own memory
        params = dict(self.model.named_parameters())  # θ_0, shared by the tasks
        query_losses = []
        for step in range(self.config.num_inner_steps):
            adapt = partial(self.adapt_step, step=step, first_order=first_order, use_vmap=use_vmap)
            if step < min(recompute_steps, self.config.num_inner_steps - 1):
                params = recomputed(adapt, params, task, self.weighting_parameters())
            else:
                params = adapt(params, task)
            if step in query_steps:
                losses, predictions = over_tasks(self.query_loss, params, task, False, use_vmap)
                query_losses.append(losses)
        return torch.stack(query_losses, dim=1), predictions[..., -1] * MAX_RATING

    def forward(self, task, step_weights):
        """The meta-objective of a task batch ``task`` (``task_tensors``): the query losses
        after the last len(step_weights) inner steps weighted by ``step_weights``
        (``query_step_weights``), averaged over the tasks; and the target predictions [T, Q].
        A function of the meta-parameters alone, so that ``torch.func.grad`` of it is the
        meta-gradient (meta_learning/meta_gradient.py)."""
        num_steps = self.config.num_inner_steps
        query_losses, predictions = self.adapt(task, range(num_steps - len(step_weights), num_steps),
                                               first_order=self.config.first_order,
                                               use_vmap=self.config.use_vmap)          # [T, len(step_weights)]
        return (query_losses * step_weights.to(query_losses)).sum(dim=1).mean(), predictions

    def query_step_weights(self, iteration):
        """The weights of the query losses at outer iteration ``iteration``: while iteration <
        --multi_step_loss_num_epochs (and --use_multi_step), MAML++'s importance weights of
        every step's query loss, else the last step's alone."""
        config = self.config
        if config.use_multi_step and iteration < config.multi_step_loss_num_epochs:
            return importance_vector(iteration, self.config.num_inner_steps, config.multi_step_loss_num_epochs)
        return torch.ones(1)

    def meta_loss(self, batch, iteration):
        """The meta-objective of a TaskBatch at outer iteration ``iteration`` (``forward``),
        and its target predictions [T, Q]."""
        return self(self.task_tensors(batch), self.query_step_weights(iteration))

    def adapted_predictions(self, batch):
        """The target predictions [T, Q] after adapting to each task, without an outer graph
        (validation and testing)."""
        return self.adapt(self.task_tensors(batch), (self.config.num_inner_steps - 1,), first_order=True,
                          use_vmap=self.config.use_vmap)[1]

    # --- what the inner loop reads --------------------------------------------------------
    def weighting_parameters(self):
        """The meta-parameters besides θ that an inner step reads: the inner rates α and the
        loss-weighting networks."""
        modules = (self.inner_optimizer, self.encoder, self.task_info_mlp, self.loss_network)
        return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]

    def task_tensors(self, batch, support_chunks=None, whole_rows=False):
        """The batch as a dict of per-task tensors [T, ...], with what depends on the data
        alone computed once for the whole batch (masks, statistics, fixed weights). Each
        task's support rows are sorted longest first (the loss is a sum over them); for a
        model that ignores padding their items are cut into ``support_chunks`` groups
        (None: ``default_support_chunks``) without their all-padding columns
        (``support_item_chunks``), else — or with ``whole_rows``, the static shapes that a
        compiled graph needs — kept whole."""
        support_mask = batch.support_mask
        if support_chunks is None:
            support_chunks = self.config.support_chunks or default_support_chunks(
                self.config.model, support_mask.device, self.config.use_vmap)
        order = support_mask.sum(-1).argsort(dim=1, descending=True, stable=True)  # [T, S]

        def longest_first(rows):  # [T, S, L] -> the same rows in ``order``
            return rows.gather(1, order.unsqueeze(-1).expand_as(rows))

        support_items = longest_first(batch.support_items)
        task = {
            "support_item_chunks": (support_item_chunks(support_items, support_chunks)
                                    if self.config.model in PADDING_FREE_MODELS and not whole_rows
                                    else (support_items,)),
            "support_ratings": longest_first(batch.support_ratings),
            "support_mask": longest_first(support_mask),
            "query_items": batch.query_items,
            "query_ratings": batch.query_ratings,
            "query_mask": batch.query_mask,
        }
        if self.config.weighting == "inverse_frequency":
            task["support_weights"] = inverse_frequency_weights(task["support_ratings"], task["support_mask"])
        if self.task_info_mlp is not None:
            task["rating_stats"] = self._rating_stats(batch)
        return task

    def with_encoder_weights(self, task):
        """``task`` with the LSTM encoder's weight of every support position [T, S, L], computed
        once for the batch (it reads the ratings alone); ``task`` itself without the encoder."""
        if self.encoder is None:
            return task
        mask = task["support_mask"]
        num_tasks, num_support, length = mask.shape
        read = mask * BLIND_RATING if self.config.rating_blind_encoder else task["support_ratings"]
        weights = self.encoder(read.reshape(-1, length), mask.reshape(-1, length))
        return dict(task, support_weights=self._normalized(weights.reshape(num_tasks, num_support, length), mask))

    def _normalized(self, weights, mask):
        """With --normalize_weights, scale each task's weights [..., S, L] to mean 1 over its
        real positions: the encoder then shifts the loss between interactions, and the
        size of the inner step stays with the learnable rates α."""
        if not self.config.normalize_weights:
            return weights
        mean = (weights * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum(dim=(-2, -1), keepdim=True)
        return weights / (mean + 1e-8)

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
        return torch.stack([columns[name] for name in self.config.task_info_features], dim=-1)

    def _rating_stats(self, batch):
        """Per task mean and (unbiased) std of every real support rating, each counted once
        per support sequence it is in, on the loss scale ([T, 2]), as the reference's."""
        mask = batch.support_mask
        ratings = batch.support_ratings / MAX_RATING * self.loss_scale
        count = mask.sum(dim=(1, 2))
        mean = (ratings * mask).sum(dim=(1, 2)) / count
        variance = (((ratings - mean[:, None, None]) * mask) ** 2).sum(dim=(1, 2)) / (count - 1).clamp(min=1)
        return torch.stack([mean, variance.sqrt()], dim=1)

    def mean_weight_per_rating(self, batch):
        """Mean LSTM loss weight of the real support positions of each true rating."""
        if self.encoder is None:
            return {}
        with torch.no_grad():
            task = self.with_encoder_weights(self.task_tensors(batch, support_chunks=1))
        real = task["support_mask"] > 0
        ratings, weights = task["support_ratings"][real], task["support_weights"][real]
        return {f"{value:g}": weights[ratings == value].mean().item()
                for value in torch.unique(ratings).tolist()}
