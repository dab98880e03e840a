"""NARM, changed to per-position rating regression."""
import torch
import torch.nn as nn

from models.layers import GRU, Dropout, ItemEmbedding, Linear, RatingHead


class NARM(nn.Module):
    """Item embedding, dropout, GRU over every position (padding included), and NARM's
    attention read out at every position t, with o_t = W h_t (the reference's GRU output
    layer) and h_T the last hidden state:

        alpha_t = v . sigmoid(A1 o_t + [t real] A2 h_T)
        c_t     = h_T * (alpha_t o_t)               -> dropout -> Linear(hidden, 1)
    """

    def __init__(self, num_items, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, embedding_dim)
        self.dropout = Dropout(dropout)
        self.gru = GRU(embedding_dim, hidden_size, num_layers)
        self.project = Linear(hidden_size, hidden_size)
        self.a1 = Linear(hidden_size, hidden_size, bias=False)
        self.a2 = Linear(hidden_size, hidden_size, bias=False)
        self.v = Linear(hidden_size, 1, bias=False)
        self.head = RatingHead(hidden_size)

    def forward(self, items):  # [B, L] -> [B, L]
        h = self.gru(self.dropout(self.embedding(items)))  # [B, L, hidden]
        h_last = h[:, -1:]  # [B, 1, hidden]; the last position is always a real item
        outputs = self.project(h)  # [B, L, hidden]
        query = self.a2(h_last) * (items > 0).unsqueeze(-1)  # [B, L, hidden], zero at padding
        alpha = self.v(torch.sigmoid(self.a1(outputs) + query))  # [B, L, 1]
        context = h_last * (alpha * outputs)  # [B, L, hidden]
        return self.head(self.dropout(context))
