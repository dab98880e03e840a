"""Recommenders (rating regression) and MELO's loss-weighting networks."""
import torch

from models.gru4rec import GRU4Rec
from models.loss_weighting import LossNetwork, TaskInfoMLP, TaskStateEncoder
from models.narm import NARM
from models.ncf import NCF
from models.transformer import Transformer

BUILDERS = {
    "sasrec": lambda a: Transformer(a.num_items, a.max_seq_len, a.bert_hidden_units, a.bert_num_blocks,
                                    a.bert_num_heads, a.bert_dropout, causal=True),
    "bert4rec": lambda a: Transformer(a.num_items, a.max_seq_len, a.bert_hidden_units, a.bert_num_blocks,
                                      a.bert_num_heads, a.bert_dropout, causal=False),
    "narm": lambda a: NARM(a.num_items, a.narm_embedding_dim, a.narm_hidden_size, a.narm_n_layers,
                           a.bert_dropout),
    "gru4rec": lambda a: GRU4Rec(a.num_items, a.gru4rec_embedding_dim, a.gru4rec_hidden_size,
                                 a.gru4rec_n_layers, a.bert_dropout),
    "ncf": lambda a: NCF(a.num_items, a.bert_hidden_units, a.max_seq_len, a.bert_dropout),  # the reference has no NCF sizes
}

MODELS = tuple(BUILDERS)
# The models whose predictions at real positions ignore leading padding, so that support
# rows may run without their padding columns (--support_chunks): BERT4Rec (padded keys are
# masked) and NCF (each position on its own). SASRec attends to padded keys and the GRUs
# run over padding, as in the reference.
PADDING_FREE_MODELS = ("bert4rec", "ncf")


def model_factory(args):
    """The recommender named by ``args.model``, initialised from ``args.model_init_seed``
    without touching the global random state. ``args`` is only read."""
    if args.model not in BUILDERS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {', '.join(BUILDERS)}")
    if args.num_items < 1:
        raise ValueError(f"num_items is {args.num_items}: set it from the data before building the model")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(args.model_init_seed)
        return BUILDERS[args.model](args)


__all__ = ["model_factory", "MODELS", "PADDING_FREE_MODELS", "Transformer", "GRU4Rec", "NARM", "NCF",
           "TaskStateEncoder", "TaskInfoMLP", "LossNetwork"]
