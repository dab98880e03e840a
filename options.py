"""Command-line options shared by main.py and train_original.py.

Every flag of the reference implementation keeps its name, type and default; flags
that take a boolean parse the strings ``True`` and ``False``.  Flags added by this
project are marked "(new)".
"""
import argparse
import math

from dataloader import min_window_length
from models import MODELS, PADDING_FREE_MODELS
from rating_files import MODES


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


# the smallest value of each integer flag (None, where a flag may be left out, is not checked)
AT_LEAST = {
    **dict.fromkeys(("batch_size", "num_samples", "num_query_set", "num_inner_steps",
                     "val_size", "num_test_data", "pretraining_batch_size", "log_interval",
                     "num_train_iterations", "pretrain_epochs", "min_item", "min_sequence",
                     "min_sub_window_size", "lstm_hidden", "lstm_num_layers", "lstm_input_size",
                     "loss_num_layers", "bert_num_blocks", "bert_num_heads", "bert_hidden_units",
                     "narm_hidden_size", "narm_n_layers", "narm_embedding_dim", "gru4rec_hidden_size",
                     "gru4rec_n_layers", "gru4rec_embedding_dim", "tasks_per_pass", "support_chunks"), 1),
    "recompute_inner_steps": 0, "multi_step_loss_num_epochs": 0, "checkpoint_step": -1,
}
LEARNING_RATES = ("inner_lr", "outer_lr", "loss_lr", "task_info_lr", "lstm_lr", "learn_lr", "pretraining_lr")
NON_NEGATIVE = ("min_outer_lr", "loss_weight_decay")


class FlagError(ValueError):
    """A flag with a wrong name or value; the scripts report it in one line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises FlagError instead of printing its usage and exiting
    (``--help`` still shows the usage)."""

    def error(self, message):
        raise FlagError(message)


def build_parser():
    parser = Parser(
        description="MELO: meta-learning with adaptive weighted loss for imbalanced "
        "cold-start sequential recommendation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument

    def add_bool(name, default, help):
        add(name, type=str2bool, default=default, metavar="True|False", help=help)

    # logging and data
    add("--log_dir", type=str, default="./log", help="where meta-training logs and checkpoints go")
    add("--data_path", type=str, default="./Data/ml-1m/ratings.dat", help="rating file to read")
    add("--mode", type=str, default="ml-1m",
        help=f"dataset reader: one of {', '.join(MODES)}")
    add("--test", action="store_true", help="test a checkpoint instead of training")
    add("--test_best", action="store_false",
        help="give it to test the checkpoint of every validation instead of the best one "
        "(the reference's inverted flag: giving it sets test_best to False)")
    add("--test_baseline", action="store_true", help="test the mean-rating baseline")
    add("--checkpoint_step", type=int, default=-1,
        help="checkpoint to load: test it with --test, resume training from it otherwise")
    add("--log_interval", type=int, default=50, help="validate and checkpoint every N iterations")
    add("--num_test_data", type=int, default=1000, help="number of test users")
    add("--min_sequence", type=int, default=5, help="drop users with fewer ratings")
    add_bool("--use_random_sequence_length", False,
             "train on windows of random length instead of max_seq_len")
    add("--min_item", type=int, default=50, help="drop items with fewer ratings")
    add_bool("--drop_duplicates", False,
             "(new) drop rows that repeat an earlier row exactly (user, item, rating, date); "
             "False keeps them, as the reference does (their number is printed)")
    add_bool("--stable_date_sort", False,
             "(new) keep ratings of the same date in file order; False sorts them as the "
             "reference does (numpy's quicksort, whose order of ties depends on the CPU)")
    add("--random_seed", type=int, default=222, help="seed of the data split and the test tasks")
    add_bool("--overwrite", False,
             "(new) start a run again whose checkpoints are already there, deleting them; "
             "without it such a run stops and says how to resume or test it")
    add("--download_url", type=str, default=None,
        help="(new) URL of the MovieLens zip, for a mirror; GroupLens when not given")

    # training
    add("--num_inner_steps", type=int, default=3, help="inner-loop adaptation steps")
    add_bool("--use_learnable_params", True,
             "learn the per-layer, per-step inner learning rates (MAML++ LSLR)")
    add("--inner_lr", type=float, default=1e-3, help="initial inner learning rate")
    add("--outer_lr", type=float, default=1e-3, help="meta learning rate of the recommender")
    add("--min_outer_lr", type=float, default=1e-4, help="end of the outer cosine schedule")
    add("--loss_lr", type=float, default=1e-2, help="learning rate of the loss network")
    add("--task_info_lr", type=float, default=1e-2, help="learning rate of the MLP encoder")
    add("--lstm_lr", type=float, default=1e-1, help="learning rate of the LSTM encoder")
    add("--learn_lr", type=float, default=1e-3, help="learning rate of the inner learning rates")
    add("--loss_weight_decay", type=float, default=0, help="weight decay of the loss network")
    add("--num_train_iterations", type=int, default=2000, help="outer iterations")
    add_bool("--first_order", False, "(new) first-order meta-gradients: faster, not the paper's method")
    add("--tasks_per_pass", type=int, default=None,
        help="(new) adapt at most N tasks of a batch at once (None: all of them); the "
        "passes' gradients add up to the batch's, so this trades speed for memory only")
    add("--recompute_inner_steps", type=int, default=None,
        help="(new) keep the graphs of the first N inner steps out of memory and build them "
             "again in the outer backward: the same meta-gradient in less memory, for a "
             "forward and backward pass more per step (None: 1 on the CPU, 0 on a GPU)")
    add("--support_chunks", type=int, default=None,
        help="(new) run the model on the support sequences in N groups of similar length, "
             "each without its all-padding columns: exact for bert4rec and ncf, whose "
             "predictions ignore padding; less work on padding, more calls (None: 3 for "
             "those two when a task batch is vmapped on the CPU, else 1)")
    add_bool("--use_vmap", True, "(new) adapt a task batch at once with torch.func.vmap; False loops over tasks")
    add("--device", type=str, default=None, help="(new) torch device (None: cuda when available, else cpu)")

    # task-state encoder
    add("--lstm_hidden", type=int, default=32, help="hidden size of the LSTM encoder")
    add("--lstm_num_layers", type=int, default=1, help="layers of the LSTM encoder")
    add("--lstm_input_size", type=int, default=16, help="size of the LSTM encoder's rating embedding")
    add("--loss_num_layers", type=int, default=1, help="hidden layers of the loss network and the MLP encoder")

    # recommender
    add("--model", type=str, default="bert4rec", help=f"one of {', '.join(MODELS)}")
    add("--max_seq_len", type=int, default=30, help="longest task window, in interactions")
    add("--bert_num_blocks", type=int, default=2, help="transformer blocks of bert4rec and sasrec")
    add("--bert_num_heads", type=int, default=4, help="attention heads of bert4rec and sasrec")
    add("--bert_hidden_units", type=int, default=32, help="width of bert4rec, sasrec and ncf")
    add("--bert_dropout", type=float, default=0.1, help="dropout of every model (the reference's name)")
    add("--model_init_seed", type=int, default=5, help="seed of the models' initial parameters")
    add("--narm_hidden_size", type=int, default=32, help="GRU hidden size of narm")
    add("--narm_n_layers", type=int, default=1, help="GRU layers of narm")
    add("--narm_embedding_dim", type=int, default=32, help="item embedding size of narm")
    add("--gru4rec_hidden_size", type=int, default=32, help="GRU hidden size of gru4rec")
    add("--gru4rec_n_layers", type=int, default=2, help="GRU layers of gru4rec")
    add("--gru4rec_embedding_dim", type=int, default=32, help="item embedding size of gru4rec")

    # tasks
    add("--num_users", type=int, default=0, help="no effect, as in the reference: the data's count is used")
    add("--num_items", type=int, default=0, help="no effect, as in the reference: the data's count is used")
    add("--batch_size", type=int, default=16, help="tasks per outer iteration")
    add("--val_size", type=int, default=600, help="number of validation tasks")
    add("--num_samples", type=int, default=25, help="support sequences per task")
    add("--num_query_set", type=int, default=3, help="query sequences per task")
    add("--default_rating", type=int, default=0, help="rating value of padded positions")
    add("--min_sub_window_size", type=int, default=2, help="shortest support sequence")
    add_bool("--use_label", True, "no effect, as in the reference (its two branches compute the same statistics)")

    # loss
    add("--multi_step_loss_num_epochs", type=int, default=1000,
        help="iterations that use the MAML++ multi-step loss")
    add_bool("--use_multi_step", True, "query every inner step (MAML++ multi-step loss); False: the last only")
    add_bool("--use_adaptive_loss", True, "MELO (True) or MAML (False)")
    add_bool("--use_mlp", False, "MLP task-state encoder")
    add_bool("--use_lstm", True, "LSTM task-state encoder")
    add_bool("--use_step_loss", True, "one loss network per inner step")
    add_bool("--use_focal_loss", False, "inner loss |y - y_hat|^3")
    add_bool("--use_mlp_mean", False, "aggregate position losses with the loss network")
    add_bool("--use_softmax", False, "softmax loss weights")
    add_bool("--normalize_weights", False,
             "(new) scale each task's loss weights to mean 1, so that the encoder can shift "
             "the loss between interactions but not scale the inner step; False is the reference")
    add_bool("--normalize_loss", True, "ratings / 5 in the loss; False: losses in stars")
    add_bool("--task_info_loss", True, "MLP encoder input: each position's loss")
    add_bool("--task_info_rating_mean", True, "MLP encoder input: the task's mean rating")
    add_bool("--task_info_rating_std", True, "MLP encoder input: the task's rating std")
    add_bool("--task_info_labels", True, "MLP encoder input: each position's rating")
    add_bool("--task_info_predictions", True, "MLP encoder input: each position's prediction")

    # pretraining (train_original.py)
    add("--pretraining_batch_size", type=int, default=128, help="Basic: users per batch")
    add("--pretrain_epochs", type=int, default=100, help="Basic: training epochs")
    add("--pretraining_lr", type=float, default=1e-3, help="Basic: learning rate")
    add_bool("--load_pretrained_embedding", False, "MAML/MELO start from Basic's saved embedding")
    add_bool("--load_pretrained", False, "MAML/MELO start from Basic's whole saved model")
    add_bool("--save_pretrained", False, "Basic saves its best epoch's embedding and model for MAML/MELO")
    add_bool("--use_learned_loss_baseline", False, "weight Basic's loss with the LSTM encoder")
    add("--pretrain_log_dir", type=str, default="./log_pretrained", help="where Basic's runs go")
    return parser


def parse_args(argv=None):
    """Parse the command line (``argv`` for tests) and check the values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model not in MODELS:
        parser.error(f"--model={args.model} is not a model here; choose one of {', '.join(MODELS)}")
    if args.mode not in MODES:
        parser.error(f"--mode={args.mode} is not a dataset reader here; choose one of {', '.join(MODES)}")
    for name, minimum in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
    for name in LEARNING_RATES:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name} must be a positive finite number, got {getattr(args, name)}")
    for name in NON_NEGATIVE:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name} must be a finite number of at least 0, got {getattr(args, name)}")
    if not 0 <= args.bert_dropout < 1:
        parser.error(f"--bert_dropout is a dropout probability, in [0, 1); got {args.bert_dropout}")
    if args.max_seq_len < 3:
        parser.error(f"--max_seq_len={args.max_seq_len} is too short: a task needs a window of 3 "
                     "interactions for one query; raise it")
    if (args.support_chunks or 1) > 1 and args.model not in PADDING_FREE_MODELS:
        parser.error(f"--support_chunks={args.support_chunks} cuts padding columns, which changes "
                     f"{args.model}'s predictions (it reads the padding, as the reference's does); "
                     f"use it with {' or '.join(PADDING_FREE_MODELS)}, or leave it out")
    if args.min_sub_window_size >= args.max_seq_len:
        parser.error(f"--min_sub_window_size={args.min_sub_window_size} leaves no support sequence "
                     f"in windows of --max_seq_len={args.max_seq_len}; lower it")
    needed = min_window_length(args.min_sub_window_size)
    if args.min_sequence < needed:
        parser.error(f"--min_sequence={args.min_sequence} is too small: a task needs at least {needed} "
                     f"interactions (a support sequence of --min_sub_window_size={args.min_sub_window_size} "
                     f"before the target, and a window of 3 for a query); raise --min_sequence to {needed} "
                     "or lower --min_sub_window_size")
    if args.bert_hidden_units % args.bert_num_heads:
        parser.error(f"--bert_hidden_units={args.bert_hidden_units} must be divisible by "
                     f"--bert_num_heads={args.bert_num_heads}")
    return args
