"""BERT4Rec (bidirectional) and SASRec (causal): one transformer, changed to rating regression."""
import torch
import torch.nn as nn

from models.layers import MASKED_SCORE, Dropout, ItemEmbedding, RatingHead, TransformerBlock


class Transformer(nn.Module):
    """Item + position embedding, dropout, pre-norm blocks, Linear(hidden, 1) per position.

    Attention looks at real keys only (and at the query's own position, so that a padded
    query has something to attend to); with ``causal`` (SASRec) position t sees keys <= t,
    without it (BERT4Rec) all of them.
    """

    def __init__(self, num_items, max_seq_len, hidden, num_blocks, num_heads, dropout, causal):
        super().__init__()
        self.embedding = ItemEmbedding(num_items, hidden, max_seq_len)
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.head = RatingHead(hidden)
        order = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool)  # [query, key]
        self.register_buffer("order", order.tril() if causal else order, persistent=False)
        self.register_buffer("itself", torch.eye(max_seq_len, dtype=torch.bool), persistent=False)

    def forward(self, items):  # [B, L] -> [B, L]
        L = items.shape[-1]
        real_keys = (items > 0)[:, None, None, :]  # [B, 1, 1, L]
        visible = self.order[:L, :L] & (real_keys | self.itself[:L, :L])  # [B, 1, L, L]
        mask = torch.where(visible, 0.0, MASKED_SCORE)  # added to the attention scores
        x = self.dropout(self.embedding(items))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)
