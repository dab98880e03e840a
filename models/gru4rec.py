"""GRU4Rec, changed to rating regression."""
import torch
import torch.nn as nn

from models.layers import GRU, Dropout, ItemEmbedding, Linear, RatingHead


class GRU4Rec(nn.Module):
    """Item embedding, dropout, multi-layer GRU over every position (padding included),
    Linear(hidden, hidden), ReLU, Linear(hidden, 1)."""

    def __init__(self, num_items, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, embedding_dim)
        self.dropout = Dropout(dropout)
        self.gru = GRU(embedding_dim, hidden_size, num_layers)
        self.project = Linear(hidden_size, hidden_size)
        self.head = RatingHead(hidden_size)

    def forward(self, items):  # [B, L] -> [B, L]
        h = self.gru(self.dropout(self.embedding(items)))  # [B, L, hidden]
        return self.head(torch.relu(self.project(h)))
