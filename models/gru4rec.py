"""GRU4Rec, changed to rating regression."""
import torch
import torch.nn as nn

from models.layers import GRU, Dropout, ItemEmbedding, RatingHead


class GRU4Rec(nn.Module):
    """Item embedding, dropout, multi-layer GRU with a learned initial state, ReLU, Linear(hidden, 1)."""

    def __init__(self, num_items, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, embedding_dim)
        self.dropout = Dropout(dropout)
        self.gru = GRU(embedding_dim, hidden_size, num_layers, dropout)
        self.head = RatingHead(hidden_size)

    def forward(self, items):  # [B, L] -> [B, L]
        h = self.gru(self.dropout(self.embedding(items)), items > 0)  # [B, L, hidden]
        return self.head(torch.relu(h))
