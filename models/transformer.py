"""BERT4Rec (bidirectional) and SASRec (causal): one transformer, changed to rating regression."""
import torch
import torch.nn as nn

from models.layers import MASKED_SCORE, Dropout, ItemEmbedding, RatingHead, TransformerBlock


class Transformer(nn.Module):
    """Item + position embedding, dropout, pre-norm blocks, Linear(hidden, 1) per position.

    Attention as the reference masks it: BERT4Rec (not ``causal``) attends to the real keys
    only, so its predictions at real positions ignore the padding; SASRec (``causal``)
    attends to every key at or before the query's position, the padded ones included.
    """

    def __init__(self, num_items, max_seq_len, hidden, num_blocks, num_heads, dropout, causal):
        super().__init__()
        self.causal = causal
        self.embedding = ItemEmbedding(num_items, hidden, max_seq_len)
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.head = RatingHead(hidden)
        order = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).tril()  # [query, key]
        self.register_buffer("order", order, persistent=False)

    def forward(self, items):  # [B, L] -> [B, L]
        L = items.shape[-1]
        visible = self.order[:L, :L] if self.causal else (items > 0)[:, None, None, :]  # [1|B, 1, L|1, L]
        mask = torch.where(visible, 0.0, MASKED_SCORE)  # added to the attention scores
        x = self.dropout(self.embedding(items))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)
