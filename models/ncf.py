"""NCF as the reference has it: every task is a cold-start user, so there are no user ids.

What is left is a tower of linear layers on the item and position embedding of each
position, halving the width down to 1, with no activation between them and no output
squashing: a linear function of each position's embedding, a context-free baseline among
the sequential models.
"""
import math

import torch.nn as nn

from models.layers import Dropout, ItemEmbedding, Linear


class NCF(nn.Module):
    """Item + position embedding, dropout, floor(log2(dim)) Linear layers dim -> dim // 2 -> ... -> 1."""

    def __init__(self, num_items, dim, max_seq_len, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, dim, max_seq_len)
        self.dropout = Dropout(dropout)
        widths = [dim // 2 ** i for i in range(int(math.log2(dim)) + 1)]
        self.tower = nn.Sequential(*(Linear(wide, narrow) for wide, narrow in zip(widths, widths[1:])))

    def forward(self, items):  # [B, L] -> [B, L]
        return self.tower(self.dropout(self.embedding(items))).squeeze(-1)
