"""MELO's adaptive loss: per-position loss weights from the task state, and the loss network.

- TaskStateEncoder (default): an LSTM over a support sequence's ratings. It sees ratings
  only, so one batched call on all tasks' support sequences [T*S, L] serves every inner
  step, outside vmap.
- TaskInfoMLP (--use_lstm=False --use_mlp=True): an MLP on per-position features
  (rating statistics, label, prediction, loss); runs inside vmap.
- LossNetwork (--use_mlp_mean): aggregates a sequence's L position losses into one;
  runs inside vmap.
"""
import torch
import torch.nn as nn

from models.layers import LSTM

NUM_RATING_IDS = 11  # 0 = padding, 1..10 = 0.5, 1, ..., 5 stars


def rating_ids(ratings):
    """Star ratings -> embedding ids round(2 * rating): half stars get their own ids, 0 stays
    padding. (The reference embeds int(rating) in 7 rows, which merges each half star with
    the whole star below it; on whole stars ids 2k here are its rows k.)"""
    return torch.round(2 * ratings).long()


def masked_weights(weights, mask, use_softmax):
    """Zero the weights [..., L] at padding (mask 0); with ``use_softmax`` first normalise
    them by a softmax over the real positions (an all-padding row gives zeros, not NaN)."""
    if use_softmax:
        weights = torch.softmax(torch.where(mask > 0, weights, -1e9), dim=-1)
    return weights * mask


class TaskStateEncoder(nn.Module):
    """Rating embedding, LSTM from learned initial states, |Linear(hidden, 1)| per position.

    Started as the reference's: PyTorch's default initialisation, the padding rating an
    ordinary learned embedding row that the LSTM reads, initial states drawn N(0, 1).
    """

    def __init__(self, input_size, hidden, num_layers, use_softmax=False):
        super().__init__()
        self.use_softmax = use_softmax
        self.rating_embedding = nn.Embedding(NUM_RATING_IDS, input_size)
        self.lstm = LSTM(input_size, hidden, num_layers)
        self.initial_hidden = nn.Parameter(torch.randn(num_layers, hidden))
        self.initial_cell = nn.Parameter(torch.randn(num_layers, hidden))
        self.head = nn.Linear(hidden, 1)

    def forward(self, ratings, mask):  # ratings [N, L] stars (0 = padding), mask [N, L] -> weights [N, L]
        embedded = self.rating_embedding(rating_ids(ratings))                          # [N, L, input]
        out = self.lstm(embedded, self.initial_hidden, self.initial_cell)              # [N, L, hidden]
        return masked_weights(self.head(out).squeeze(-1).abs(), mask, self.use_softmax)


class TaskInfoMLP(nn.Module):
    """|MLP| on per-position task features: Linear(F, F), ReLU, Linear(F, 1), abs."""

    def __init__(self, num_features, use_softmax=False):
        super().__init__()
        self.use_softmax = use_softmax
        self.mlp = nn.Sequential(nn.Linear(num_features, num_features), nn.ReLU(), nn.Linear(num_features, 1))

    def forward(self, features, mask):  # features [..., L, F], mask [..., L] -> weights [..., L]
        return masked_weights(self.mlp(features).squeeze(-1).abs(), mask, self.use_softmax)


class StepLossNetwork(nn.Sequential):
    """(num_layers - 1) x (Linear(L, L), ReLU), then Linear(L, 1)."""

    def __init__(self, max_seq_len, num_layers):
        hidden = [layer for _ in range(num_layers - 1) for layer in (nn.Linear(max_seq_len, max_seq_len), nn.ReLU())]
        super().__init__(*hidden, nn.Linear(max_seq_len, 1))


class LossNetwork(nn.Module):
    """One StepLossNetwork per inner step (``use_step_loss``), else one for all steps."""

    def __init__(self, num_inner_steps, max_seq_len, num_layers=1, use_step_loss=True):
        super().__init__()
        self.use_step_loss = use_step_loss
        count = num_inner_steps if use_step_loss else 1
        self.networks = nn.ModuleList(StepLossNetwork(max_seq_len, num_layers) for _ in range(count))

    def forward(self, position_losses, step):  # [..., L] (zero at padding), int -> [...]
        network = self.networks[step if self.use_step_loss else 0]
        return network(position_losses).squeeze(-1)
