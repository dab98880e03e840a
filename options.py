"""Command-line options shared by main.py and train_original.py.

Every flag of the reference implementation keeps its name, type and default; flags
that take a boolean parse the strings ``True`` and ``False``.  Flags added by this
project are marked "(new)".
"""
import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch

from config import min_window_length
from models import COMPILED_MODELS, MODELS, PADDING_FREE_MODELS
from ratings.rating_files import MODES


def str2bool(value):
    """Parse 'True'/'False' (any case, also 1/0, yes/no) into a bool."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


@dataclass(frozen=True)
class Flag:
    """One flag and what the project needs to know of it, declared once in ``FLAGS``.

    ``resume``: whether a run resumed from a checkpoint may give it another value
    ("changes": learning rates and the run's length go to the optimisers; the rest change
    how the same computation runs, or where things go), must give the checkpoint's
    ("fixed") or is not compared ("ignored": read by nothing). What tells one run's files
    from another's (run_files.run_identity): the flags with ``identity="data"`` and those
    that set the model's shape (``shape_of``: the models whose shape it sets) for every run;
    for MAML and MELO also every "fixed" flag and those with ``identity="training"`` (the
    learning rates, the run's length and batches, its starting point), so that runs that
    compute something else never share a folder. ``study``: reproduce.py's own data
    or budget flag ("data", "budget"), or a flag it sets for each run ("per run").
    ``at_least``, ``at_most``: the range of an integer; ``rate``: a finite number, "positive"
    (learning rates) or "non-negative".
    """
    name: str
    default: object
    help: str
    resume: str
    type: object = None                 # None: the default's type; str2bool for booleans
    action: str | None = None           # "store_true" / "store_false": a switch without a value
    identity: str | None = None         # "data" or "training", see above
    shape_of: tuple = ()
    study: str | None = None
    at_least: int | None = None
    at_most: int | None = None
    rate: str | None = None

    def out_of_range(self, value):
        """What is wrong with an integer ``value`` of this flag, None when it is in range."""
        if self.at_least is not None and value is not None and value < self.at_least:
            return f"--{self.name} must be at least {self.at_least}, got {value}"
        if self.at_most is not None and value is not None and value > self.at_most:
            return f"--{self.name} must be at most {self.at_most}, got {value}"
        return None


def _bool(name, default, help, resume, **properties):
    return Flag(name, default, help, resume, type=str2bool, **properties)


FLAGS = (
    # logging and data
    Flag("log_dir", "./log", "where meta-training logs and checkpoints go", "changes", study="per run"),
    Flag("data_path", "./Data/ml-1m/ratings.dat", "rating file to read", "fixed", study="per run"),
    Flag("mode", "ml-1m", f"dataset reader: one of {', '.join(MODES)}", "fixed", identity="data", study="per run"),
    Flag("test", False, "test a checkpoint instead of training", "changes", action="store_true", study="per run"),
    Flag("test_best", True, "give it to test the checkpoint of every validation instead of the best one "
         "(the reference's inverted flag: giving it sets test_best to False)", "changes",
         action="store_false", study="per run"),
    Flag("test_baseline", False, "test the mean-rating baseline", "changes", action="store_true", study="per run"),
    Flag("checkpoint_step", -1, "checkpoint to load: test it with --test, resume training from it otherwise",
         "changes", study="per run", at_least=-1),
    Flag("log_interval", 50, "validate and checkpoint every N iterations", "changes", study="budget", at_least=1, identity="training"),
    Flag("num_test_data", 1000, "number of test users", "fixed", identity="data", study="data", at_least=1),
    Flag("min_sequence", 5, "drop users with fewer ratings", "fixed", identity="data", study="data", at_least=1),
    _bool("use_random_sequence_length", False, "train on windows of random length instead of max_seq_len", "fixed"),
    Flag("min_item", 50, "drop items with fewer ratings", "fixed", identity="data", study="data", at_least=1),
    _bool("drop_duplicates", False, "(new) drop rows that repeat an earlier row exactly (user, item, rating, "
          "date); False keeps them, as the reference does (their number is printed)", "fixed", identity="data"),
    _bool("stable_date_sort", False, "(new) keep ratings of the same date in file order; False sorts them as "
          "the reference does (numpy's quicksort, whose order of ties depends on the CPU)", "fixed", identity="data"),
    Flag("random_seed", 222, "seed of the data split and the test tasks", "fixed", identity="data", study="per run",
         at_least=0, at_most=2**32 - 1),   # numpy's seeds
    _bool("overwrite", False, "(new) start a run again whose checkpoints are already there, deleting them; "
          "without it such a run stops and says how to resume or test it", "changes"),
    Flag("resume_from", None, "(new) a MAML/MELO checkpoint of another run of the same data, model and method "
         "to go on from, with other learning rates, batches or length: this run starts from its whole state, "
         "in a folder of its own, and records where it began", "changes", type=str),
    Flag("download_url", None, "(new) URL of the MovieLens zip, for a mirror; GroupLens when not given",
         "changes", type=str),

    # training
    Flag("num_inner_steps", 3, "inner-loop adaptation steps", "fixed", at_least=1),
    _bool("use_learnable_params", True, "learn the per-layer, per-step inner learning rates (MAML++ LSLR)", "fixed"),
    Flag("inner_lr", 1e-3, "initial inner learning rate", "fixed", rate="positive"),
    Flag("outer_lr", 1e-3, "meta learning rate of the recommender", "changes", rate="positive", identity="training"),
    Flag("min_outer_lr", 1e-4, "end of the outer cosine schedule", "changes", rate="non-negative", identity="training"),
    Flag("loss_lr", 1e-2, "learning rate of the loss network", "changes", rate="positive", identity="training"),
    Flag("task_info_lr", 1e-2, "learning rate of the MLP encoder", "changes", rate="positive", identity="training"),
    Flag("lstm_lr", 1e-1, "learning rate of the LSTM encoder", "changes", rate="positive", identity="training"),
    Flag("learn_lr", 1e-3, "learning rate of the inner learning rates", "changes", rate="positive", identity="training"),
    Flag("loss_weight_decay", 0, "weight decay of the loss network", "changes", type=float, rate="non-negative", identity="training"),
    Flag("num_train_iterations", 2000, "outer iterations", "changes", study="budget", at_least=1, identity="training"),
    _bool("first_order", False, "(new) first-order meta-gradients: faster, not the paper's method", "fixed"),
    Flag("tasks_per_pass", None, "(new) adapt at most N tasks of a batch at once (None: all of them); the "
         "passes' gradients add up to the batch's, so this trades speed for memory only", "changes",
         type=int, at_least=1),
    Flag("recompute_inner_steps", None, "(new) keep the graphs of the first N inner steps out of memory and "
         "build them again in the outer backward: the same meta-gradient in less memory, for a forward and "
         "backward pass more per step (None: 1 on the CPU, 0 on a GPU)", "changes", type=int, at_least=0),
    Flag("support_chunks", None, "(new) run the model on the support sequences in N groups of similar length, "
         "each without its all-padding columns: exact for bert4rec and ncf, whose predictions ignore padding; "
         "less work on padding, more calls (None: 3 for those two when a task batch is vmapped on the CPU, "
         "else 1)", "changes", type=int, at_least=1),
    _bool("use_vmap", True, "(new) adapt a task batch at once with torch.func.vmap; False loops over tasks",
          "changes"),
    _bool("compile", False, "(new) compile the meta-gradient of a task batch into one graph with torch.compile "
          "(the same gradients; minutes to compile, then faster per iteration: docs/performance.md); keeps "
          "the support rows whole (no --support_chunks or --recompute_inner_steps); bert4rec, sasrec and ncf",
          "changes"),
    Flag("device", None, "(new) torch device (None: cuda when available, else cpu)", "changes", type=str),

    # task-state encoder
    Flag("lstm_hidden", 32, "hidden size of the LSTM encoder", "fixed", at_least=1),
    Flag("lstm_num_layers", 1, "layers of the LSTM encoder", "fixed", at_least=1),
    Flag("lstm_input_size", 16, "size of the LSTM encoder's rating embedding", "fixed", at_least=1),
    Flag("loss_num_layers", 1, "hidden layers of the loss network and the MLP encoder", "fixed", at_least=1),

    # recommender
    Flag("model", "bert4rec", f"one of {', '.join(MODELS)}", "fixed", study="per run"),
    Flag("max_seq_len", 30, "longest task window, in interactions", "fixed", identity="data", study="data"),
    Flag("bert_num_blocks", 2, "transformer blocks of bert4rec and sasrec", "fixed",
         shape_of=("bert4rec", "sasrec"), at_least=1),
    Flag("bert_num_heads", 4, "attention heads of bert4rec and sasrec", "fixed",
         shape_of=("bert4rec", "sasrec"), at_least=1),
    Flag("bert_hidden_units", 32, "width of bert4rec, sasrec and ncf", "fixed",
         shape_of=("bert4rec", "sasrec", "ncf"), at_least=1),
    Flag("bert_dropout", 0.1, "dropout of every model (the reference's name)", "fixed"),
    Flag("model_init_seed", 5, "seed of the models' initial parameters", "fixed"),
    Flag("narm_hidden_size", 32, "GRU hidden size of narm", "fixed", shape_of=("narm",), at_least=1),
    Flag("narm_n_layers", 1, "GRU layers of narm", "fixed", shape_of=("narm",), at_least=1),
    Flag("narm_embedding_dim", 32, "item embedding size of narm", "fixed", shape_of=("narm",), at_least=1),
    Flag("gru4rec_hidden_size", 32, "GRU hidden size of gru4rec", "fixed", shape_of=("gru4rec",), at_least=1),
    Flag("gru4rec_n_layers", 2, "GRU layers of gru4rec", "fixed", shape_of=("gru4rec",), at_least=1),
    Flag("gru4rec_embedding_dim", 32, "item embedding size of gru4rec", "fixed", shape_of=("gru4rec",), at_least=1),

    # tasks
    Flag("num_users", 0, "no effect, as in the reference: the data's count is used", "ignored"),
    Flag("num_items", 0, "no effect, as in the reference: the data's count is used", "ignored"),
    Flag("batch_size", 16, "tasks per outer iteration", "changes", at_least=1, identity="training"),
    Flag("val_size", 600, "number of validation tasks", "fixed", identity="data", study="data", at_least=1),
    Flag("num_samples", 25, "support sequences per task", "fixed", at_least=1),
    Flag("num_query_set", 3, "query sequences per task", "fixed", at_least=1),
    Flag("default_rating", 0, "rating value of padded positions", "fixed"),
    Flag("min_sub_window_size", 2, "shortest support sequence", "fixed", at_least=1),
    _bool("use_label", True, "no effect, as in the reference (its two branches compute the same statistics)",
          "fixed"),

    # loss
    Flag("multi_step_loss_num_epochs", 1000, "iterations that use the MAML++ multi-step loss", "fixed", at_least=0),
    _bool("use_multi_step", True, "query every inner step (MAML++ multi-step loss); False: the last only", "fixed"),
    _bool("use_adaptive_loss", True, "MELO (True) or MAML (False)", "fixed", study="per run"),
    _bool("use_mlp", False, "MLP task-state encoder", "fixed"),
    _bool("use_lstm", True, "LSTM task-state encoder", "fixed"),
    _bool("use_step_loss", True, "one loss network per inner step", "fixed"),
    _bool("use_focal_loss", False, "inner loss |y - y_hat|^3", "fixed"),
    _bool("use_mlp_mean", False, "aggregate position losses with the loss network", "fixed"),
    _bool("use_softmax", False, "softmax loss weights", "fixed"),
    _bool("normalize_weights", False, "(new) scale each task's loss weights to mean 1, so that the encoder can "
          "shift the loss between interactions but not scale the inner step; False is the reference", "fixed"),
    _bool("normalize_loss", True, "ratings / 5 in the loss; False: losses in stars", "fixed"),
    _bool("rating_blind_encoder", False, "(new, a control) MELO's LSTM encoder reads the same rating at every "
          "real position: it can learn a step size and a profile over positions but cannot re-weight ratings",
          "fixed"),
    _bool("inverse_frequency_weights", False, "(new, a control) MAML's support loss weighs each interaction by the "
          "inverse frequency of its rating in the task's support set, scaled to mean 1: re-weighting, nothing "
          "learned", "fixed"),
    _bool("task_info_loss", True, "MLP encoder input: each position's loss", "fixed"),
    _bool("task_info_rating_mean", True, "MLP encoder input: the task's mean rating", "fixed"),
    _bool("task_info_rating_std", True, "MLP encoder input: the task's rating std", "fixed"),
    _bool("task_info_labels", True, "MLP encoder input: each position's rating", "fixed"),
    _bool("task_info_predictions", True, "MLP encoder input: each position's prediction", "fixed"),

    # pretraining (train_original.py)
    Flag("pretraining_batch_size", 128, "Basic: users per batch", "changes", at_least=1),
    Flag("pretrain_epochs", 100, "Basic: training epochs", "changes", study="budget", at_least=1),
    Flag("pretraining_lr", 1e-3, "Basic: learning rate", "changes", rate="positive"),
    _bool("load_pretrained_embedding", False, "MAML/MELO start from Basic's saved embedding", "changes",
          study="per run", identity="training"),
    _bool("load_pretrained", False, "MAML/MELO start from Basic's whole saved model", "changes", study="per run", identity="training"),
    _bool("save_pretrained", False, "Basic saves its best epoch's embedding and model for MAML/MELO", "changes",
          study="per run"),
    _bool("use_learned_loss_baseline", False, "weight Basic's loss with the LSTM encoder", "changes"),
    Flag("pretrain_log_dir", "./log_pretrained", "where Basic's runs go", "changes", study="per run"),
)
FLAG = {flag.name: flag for flag in FLAGS}


def flags_with(**properties):
    """The names of the flags with these properties, in table order."""
    return tuple(flag.name for flag in FLAGS
                 if all(getattr(flag, key) == value for key, value in properties.items()))


class FlagError(ValueError):
    """A flag with a wrong name or value; the scripts report it in one line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises FlagError instead of printing its usage and exiting
    (``--help`` still shows the usage)."""

    def error(self, message):
        raise FlagError(message)


def finite_in_float32(value):
    """Whether a rate stays finite as the float32 tensor the models use."""
    return math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max


def build_parser():
    """The command line of main.py and train_original.py, from ``FLAGS``."""
    parser = Parser(
        description="MELO: meta-learning with adaptive weighted loss for imbalanced "
        "cold-start sequential recommendation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag in FLAGS:
        if flag.action is not None:
            parser.add_argument(f"--{flag.name}", action=flag.action, help=flag.help)
        else:
            parser.add_argument(f"--{flag.name}", type=flag.type or type(flag.default), default=flag.default,
                                metavar="True|False" if flag.type is str2bool else None, help=flag.help)
    return parser


@dataclass(frozen=True)
class Rule:
    """A check that compares flags (the table's ranges check each flag alone): the command line
    ``breaks`` it, and the ``error`` says what is wrong and what to do; both read the flags."""
    breaks: Callable[[argparse.Namespace], bool]
    error: Callable[[argparse.Namespace], str]


RULES = (
    Rule(lambda a: a.model not in MODELS,
         lambda a: f"--model={a.model} is not a model here; choose one of {', '.join(MODELS)}"),
    Rule(lambda a: a.mode not in MODES,
         lambda a: f"--mode={a.mode} is not a dataset reader here; choose one of {', '.join(MODES)}"),
    Rule(lambda a: not 0 <= a.bert_dropout < 1,
         lambda a: f"--bert_dropout is a dropout probability, in [0, 1); got {a.bert_dropout}"),
    Rule(lambda a: a.max_seq_len < 3,
         lambda a: f"--max_seq_len={a.max_seq_len} is too short: a task needs a window of 3 interactions for one "
                   "query; raise it"),
    Rule(lambda a: (a.support_chunks or 1) > 1 and a.model not in PADDING_FREE_MODELS,
         lambda a: f"--support_chunks={a.support_chunks} cuts padding columns, which changes {a.model}'s predictions "
                   f"(it reads the padding, as the reference's does); use it with {' or '.join(PADDING_FREE_MODELS)}, "
                   "or leave it out"),
    Rule(lambda a: a.min_sub_window_size >= a.max_seq_len,
         lambda a: f"--min_sub_window_size={a.min_sub_window_size} leaves no support sequence in windows of "
                   f"--max_seq_len={a.max_seq_len}; lower it"),
    Rule(lambda a: a.min_sequence < min_window_length(a.min_sub_window_size),
         lambda a: f"--min_sequence={a.min_sequence} is too small: a task needs at least "
                   f"{min_window_length(a.min_sub_window_size)} interactions (a support sequence of "
                   f"--min_sub_window_size={a.min_sub_window_size} before the target, and a window of 3 for a "
                   f"query); raise --min_sequence to {min_window_length(a.min_sub_window_size)} or lower "
                   "--min_sub_window_size"),
    Rule(lambda a: a.compile and not a.use_vmap,
         lambda a: "--compile=True compiles the vmapped inner loop: give it with --use_vmap=True"),
    Rule(lambda a: a.compile and a.model not in COMPILED_MODELS,
         lambda a: f"--compile=True with --model={a.model}: its GRU, unrolled into one graph, takes over 20 minutes "
                   f"to compile; compile {', '.join(COMPILED_MODELS)}, or leave --compile out"),
    Rule(lambda a: a.inverse_frequency_weights and a.use_adaptive_loss,
         lambda a: "--inverse_frequency_weights=True weighs MAML's support loss: give it with "
                   "--use_adaptive_loss=False (MELO learns its weights)"),
    Rule(lambda a: a.rating_blind_encoder and not (a.use_adaptive_loss and a.use_lstm),
         lambda a: "--rating_blind_encoder=True changes MELO's LSTM encoder: give it with --use_adaptive_loss=True "
                   "--use_lstm=True"),
    Rule(lambda a: a.bert_hidden_units % a.bert_num_heads != 0,
         lambda a: f"--bert_hidden_units={a.bert_hidden_units} must be divisible by "
                   f"--bert_num_heads={a.bert_num_heads}"),
)


def parse_args(argv=None):
    """Parse the command line (``argv`` for tests) and check the values: each flag's range in
    the table, then the rules between flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in FLAGS:
        value = getattr(args, flag.name)
        if (wrong := flag.out_of_range(value)) is not None:
            parser.error(wrong)
        if flag.rate == "positive" and not (finite_in_float32(value) and value > 0):
            parser.error(f"--{flag.name} must be a positive finite number (in float32), got {value}")
        if flag.rate == "non-negative" and not (finite_in_float32(value) and value >= 0):
            parser.error(f"--{flag.name} must be a finite number of at least 0 (in float32), got {value}")
    for rule in RULES:
        if rule.breaks(args):
            parser.error(rule.error(args))
    return args
