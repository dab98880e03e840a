"""Building blocks shared by the recommenders.

Everything here is written from plain tensor ops so that the models run under
``torch.func.functional_call`` and ``torch.func.vmap`` with exact second-order
gradients: no nn.LayerNorm (its affine form gives wrong second-order gradients under
vmap), no fused attention and no nn.GRU or nn.LSTM (no double backward, no vmap, and
torch.compile does not trace them).
Sequences are left-padded with item id 0. Layers start as the reference's do
(``Linear``, ``Embedding``), since how far one inner step moves a prediction depends on it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MASKED_SCORE = -1e9  # finite, so that no mask can turn the softmax into NaN


class Linear(nn.Linear):
    """nn.Linear started as the reference starts every layer of its recommenders:
    xavier_uniform_ weight, zero bias."""

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding started with xavier_uniform_, as the reference's embeddings are."""

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.weight)


class ItemEmbedding(nn.Module):
    """Item-id embedding, plus a learned position embedding when ``max_seq_len`` is given
    (the transformers and NCF).

    Row 0, the padding id, is an ordinary learned row as in the reference: padded positions
    carry it into every model, and the GRU models read it as a context that the inner loop
    adapts. Positions count back from the end of the sequence, where the left-padded items
    are (at the full length this is the reference's numbering from the left): the last item
    has the last position whatever the length, so a model that ignores padded positions
    predicts the same with leading padding columns cut off.
    Models keep it as ``model.embedding`` so it can be saved and loaded on its own.
    """

    def __init__(self, num_items, dim, max_seq_len=None):
        super().__init__()
        self.items = Embedding(num_items + 1, dim)
        self.positions = Embedding(max_seq_len, dim) if max_seq_len else None

    def forward(self, items):  # [B, L] -> [B, L, dim]
        x = self.items(items)
        if self.positions is not None:
            x = x + self.positions.weight[self.positions.num_embeddings - items.shape[-1]:]
        return x


class Dropout(nn.Module):
    """Inverted dropout, x * [u >= p] / (1 - p) with u ~ U(0, 1) per element: nn.Dropout's
    result, with its mask drawn by torch.rand, which is about twice as fast on the CPU as
    nn.Dropout's bernoulli_ (measured under vmap with randomness="different")."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1 / (1 - self.p))


class RatingHead(Linear):
    """Linear(dim, 1) per position -> predicted rating / 5 as 0.1 + sigmoid, in (0.1, 1.1)."""

    def __init__(self, dim):
        super().__init__(dim, 1)

    def forward(self, x):  # [B, L, dim] -> [B, L]
        return 0.1 + torch.sigmoid(super().forward(x).squeeze(-1))


class LayerNorm(nn.Module):
    """BERT4Rec's layer norm, a * (x - mean) / (std + eps) + b."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):  # [..., dim]
        centered = x - x.mean(-1, keepdim=True)
        # the unbiased std of torch.std, from sums: Tensor.std over a short last dimension
        # is an order of magnitude slower on the CPU
        std = (centered.square().sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
        return self.weight * centered / (std + self.eps) + self.bias


class SelfAttention(nn.Module):
    """Multi-head self-attention, dropout(softmax(QK^T / sqrt(d) + mask)) V with plain ops.

    Query, key and value are separate layers, as in the reference: every parameter tensor
    gets its own learnable inner learning rates (MAML++ LSLR), so fusing them would tie
    three rates into one.
    """

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.out = Linear(dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x, mask):  # x [B, L, D], mask [B|1, 1, L, L] (query, key): 0 or MASKED_SCORE -> [B, L, D]
        B, L, D = x.shape

        def heads(projection):  # [B, L, D] -> [B, heads, L, d]
            return projection(x).reshape(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1) + mask  # [B, heads, L, L]
        y = self.dropout(torch.softmax(scores, dim=-1)) @ v  # [B, heads, L, d]
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), x + drop(ffn(norm(x))), then dropout; the
    feed-forward layer is Linear, GELU (tanh form), dropout, Linear."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.attn_norm = LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = nn.Sequential(Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), Dropout(dropout),
                                 Linear(4 * dim, dim))
        self.dropout = Dropout(dropout)

    def forward(self, x, mask):  # x [B, L, D], mask [B|1, 1, L, L]: 0 where visible, else MASKED_SCORE
        x = x + self.dropout(self.attn(self.attn_norm(x), mask))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return self.dropout(x)


class GRULayer(nn.Module):
    """One GRU layer (nn.GRU's equations), run from a given initial state over every
    position, padding included, as the reference's GRU is.

    The input projections of all time steps are one matmul; only the hidden recurrence is
    looped.
    """

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.input_proj = Linear(input_size, 3 * hidden_size)
        self.hidden_proj = Linear(hidden_size, 3 * hidden_size)

    def forward(self, x, initial_state):  # x [B, L, input], initial_state [hidden] -> [B, L, hidden]
        h = initial_state.expand(x.shape[0], -1)  # [B, hidden]
        outputs = []
        gate_sizes = [2 * h.shape[-1], h.shape[-1]]  # reset and update gates, candidate
        for x_gates in self.input_proj(x).unbind(1):
            x_rz, x_n = x_gates.split(gate_sizes, dim=-1)
            h_rz, h_n = self.hidden_proj(h).split(gate_sizes, dim=-1)
            reset, update = torch.sigmoid(x_rz + h_rz).chunk(2, dim=-1)
            candidate = torch.tanh(x_n + reset * h_n)
            # (1 - update) * candidate + update * h, in fewer ops (each is differentiated twice)
            h = candidate + update * (h - candidate)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class GRU(nn.Module):
    """Stacked GRU layers from learned initial states (one [num_layers, hidden] tensor,
    started N(0, 1)), no dropout between the layers: the reference's GRU."""

    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(GRULayer(size, hidden_size) for size in sizes)
        self.initial_states = nn.Parameter(torch.randn(num_layers, hidden_size))

    def forward(self, x):  # x [B, L, input] -> [B, L, hidden], the last layer's states
        for layer, initial_state in zip(self.layers, self.initial_states):
            x = layer(x, initial_state)
        return x


class LSTM(nn.Module):
    """nn.LSTM (batch first, gates i, f, g, o) from given initial states, with nn.LSTM's
    parameter names and initialisation (uniform ±1/sqrt(hidden), drawn in the same order),
    so that its checkpoints and random draws are nn.LSTM's."""

    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        self.num_layers = num_layers
        bound = 1 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            size = input_size if layer == 0 else hidden_size
            for name, shape in (("weight_ih", (4 * hidden_size, size)), ("weight_hh", (4 * hidden_size, hidden_size)),
                                ("bias_ih", (4 * hidden_size,)), ("bias_hh", (4 * hidden_size,))):
                self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def forward(self, x, initial_hidden, initial_cell):
        """x [N, L, input], initial states [num_layers, hidden] -> the last layer's states [N, L, hidden]."""
        for layer in range(self.num_layers):
            weight_ih, weight_hh, bias_ih, bias_hh = (getattr(self, f"{name}_l{layer}")
                                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            h = initial_hidden[layer].expand(x.shape[0], -1)  # [N, hidden]
            c = initial_cell[layer].expand(x.shape[0], -1)
            outputs = []
            for x_gates in F.linear(x, weight_ih, bias_ih).unbind(1):
                gates = x_gates + F.linear(h, weight_hh, bias_hh)                      # [N, 4 * hidden]
                in_gate, forget_gate, cell_input, out_gate = gates.chunk(4, dim=-1)
                c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_input)
                h = torch.sigmoid(out_gate) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return x
