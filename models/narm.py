"""NARM, changed to per-position rating regression."""
import torch
import torch.nn as nn

from models.layers import GRU, Dropout, ItemEmbedding, RatingHead


class NARM(nn.Module):
    """Item embedding, GRU, and NARM's attention read out at every position t:

        alpha_t = v . sigmoid(A1 h_t + A2 h_T)      (zero at padded positions)
        c_t     = h_T * (alpha_t h_t)               -> dropout -> Linear(hidden, 1)

    h_T is the hidden state at the last position, always a real item since sequences
    are left-padded.
    """

    def __init__(self, num_items, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, embedding_dim)
        self.dropout = Dropout(dropout)
        self.gru = GRU(embedding_dim, hidden_size, num_layers, dropout)
        self.a1 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.a2 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v = nn.Linear(hidden_size, 1, bias=False)
        self.head = RatingHead(hidden_size)

    def forward(self, items):  # [B, L] -> [B, L]
        real = items > 0
        h = self.gru(self.dropout(self.embedding(items)), real)  # [B, L, hidden]
        h_last = h[:, -1:]  # [B, 1, hidden]
        alpha = self.v(torch.sigmoid(self.a1(h) + self.a2(h_last))) * real.unsqueeze(-1)  # [B, L, 1]
        context = h_last * (alpha * h)  # [B, L, hidden]
        return self.head(self.dropout(context))
