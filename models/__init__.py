"""Recommenders (rating regression) and MELO's loss-weighting networks."""
import torch

from models.gru4rec import GRU4Rec
from models.loss_weighting import LossNetwork, TaskInfoMLP, TaskStateEncoder
from models.narm import NARM
from models.ncf import NCF
from models.transformer import Transformer

BUILDERS = {
    "sasrec": lambda a: Transformer(a.num_items, a.max_seq_len, a.bert_hidden_units, a.bert_num_blocks,
                                    a.bert_num_heads, a.dropout, causal=True),
    "bert4rec": lambda a: Transformer(a.num_items, a.max_seq_len, a.bert_hidden_units, a.bert_num_blocks,
                                      a.bert_num_heads, a.dropout, causal=False),
    "narm": lambda a: NARM(a.num_items, a.narm_embedding_dim, a.narm_hidden_size, a.narm_n_layers,
                           a.dropout),
    "gru4rec": lambda a: GRU4Rec(a.num_items, a.gru4rec_embedding_dim, a.gru4rec_hidden_size,
                                 a.gru4rec_n_layers, a.dropout),
    "ncf": lambda a: NCF(a.num_items, a.bert_hidden_units, a.max_seq_len, a.dropout),  # the reference has no NCF sizes
}

MODELS = tuple(BUILDERS)
# The models whose predictions at real positions ignore leading padding, so that support
# rows may run without their padding columns (--support_chunks): BERT4Rec (padded keys are
# masked) and NCF (each position on its own). SASRec attends to padded keys and the GRUs
# run over padding, as in the reference.
PADDING_FREE_MODELS = ("bert4rec", "ncf")
# The models whose meta-gradient --compile makes one graph of in minutes. The GRUs' recurrence
# unrolls over every position, inner step and both backward passes, which takes far longer
# to compile (docs/performance.md); a loop that is not unrolled, torch's ``scan``, is refused
# by Dynamo under torch.func's transforms.
COMPILED_MODELS = ("bert4rec", "sasrec", "ncf")


def model_factory(config):
    """The recommender of a config.ModelConfig, initialised from its ``model_init_seed``
    without touching the global random state."""
    if config.model not in BUILDERS:
        raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(BUILDERS)}")
    if config.num_items < 1:
        raise ValueError(f"num_items is {config.num_items}: give the number of items of the data")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.model_init_seed)
        return BUILDERS[config.model](config)


__all__ = ["model_factory", "MODELS", "PADDING_FREE_MODELS", "Transformer", "GRU4Rec", "NARM", "NCF",
           "TaskStateEncoder", "TaskInfoMLP", "LossNetwork"]
