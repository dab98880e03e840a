"""NCF without users: every task is a cold-start user, so there are no user ids to embed.

What is left of NCF's MLP tower is an item-embedding MLP applied at each position on
its own; it ignores the order and the rest of the sequence and is a context-free
baseline among the sequential models.
"""
import torch.nn as nn

from models.layers import Dropout, ItemEmbedding, RatingHead


class NCF(nn.Module):
    """Item embedding, dropout, Linear(dim, dim), ReLU, dropout, Linear(dim, 1) per position."""

    def __init__(self, num_items, dim, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, dim)
        self.mlp = nn.Sequential(Dropout(dropout), nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout))
        self.head = RatingHead(dim)

    def forward(self, items):  # [B, L] -> [B, L]
        return self.head(self.mlp(self.embedding(items)))
