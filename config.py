"""What each part of the project needs from the command line, as small frozen objects built
once from the parsed flags (options.py) by the scripts: the data (``DataConfig``), the
tasks (``TaskConfig``), the recommender (``ModelConfig``), the method (``MethodConfig``) and
how main.py and train_original.py train (``TrainingConfig``, ``BasicConfig``), and a run's
files (``RunFilesConfig``); ``MetaRunConfig`` and ``BasicRunConfig`` gather what each
trainer takes. Their fields carry the names of the flags they come from, unless said
otherwise."""
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Mapping


def min_window_length(min_sub_window_size: int) -> int:
    """Shortest task window: one support sequence before the target, and |W| - 2 >= 1 queries."""
    return max(3, min_sub_window_size + 1)


def _from_flags(cls, args, **derived):
    """``cls`` with each field not in ``derived`` read from the flag of the same name."""
    return cls(**{field.name: derived[field.name] if field.name in derived else getattr(args, field.name)
                  for field in fields(cls)})


@dataclass(frozen=True)
class DataConfig:
    """The rating file, how it is read and filtered, and how its users are split."""
    data_path: str
    mode: str
    min_item: int
    min_sequence: int
    num_test_data: int
    val_size: int
    random_seed: int
    drop_duplicates: bool
    stable_date_sort: bool
    max_seq_len: int
    download_url: str | None = None

    @classmethod
    def from_args(cls, args):
        return _from_flags(cls, args)


@dataclass(frozen=True)
class TaskConfig:
    """How a user becomes a task: windows, support and query sequences, their random draws."""
    max_seq_len: int
    num_samples: int
    num_query_set: int
    min_sub_window_size: int
    min_sequence: int
    use_random_sequence_length: bool
    default_rating: int
    random_seed: int
    val_size: int

    @classmethod
    def from_args(cls, args):
        return _from_flags(cls, args)


@dataclass(frozen=True)
class ModelConfig:
    """The recommender: its kind, sizes, dropout and initialisation seed. ``num_items`` comes
    from the data; ``dropout`` from --bert_dropout, which the reference uses for every model."""
    model: str
    num_items: int
    max_seq_len: int
    dropout: float
    model_init_seed: int
    bert_hidden_units: int
    bert_num_blocks: int
    bert_num_heads: int
    narm_embedding_dim: int
    narm_hidden_size: int
    narm_n_layers: int
    gru4rec_embedding_dim: int
    gru4rec_hidden_size: int
    gru4rec_n_layers: int

    @classmethod
    def from_args(cls, args, num_items):
        return _from_flags(cls, args, num_items=num_items, dropout=args.bert_dropout)


@dataclass(frozen=True)
class MethodConfig:
    """MAML++ with or without MELO's weighting, its meta-objective, and how its inner loop runs.

    ``weighting`` is None for MAML ("inverse_frequency" with --inverse_frequency_weights), else
    MELO's task-state encoder: "lstm" (--use_lstm, which takes precedence, as in the
    reference; it reads no ratings with --rating_blind_encoder) or "mlp" (--use_mlp); with
    ``use_loss_network`` (--use_mlp_mean, or MELO with neither encoder) the loss network
    aggregates each support sequence's weighted losses. ``task_info_features`` are the
    MLP encoder's inputs that the --task_info_* flags switch on. ``recompute_inner_steps``
    and ``support_chunks`` are None when not given (their defaults depend on the device)."""
    model: str
    max_seq_len: int
    num_inner_steps: int
    inner_lr: float
    use_learnable_params: bool
    weighting: str | None
    use_loss_network: bool
    lstm_input_size: int
    lstm_hidden: int
    lstm_num_layers: int
    use_softmax: bool
    task_info_features: tuple
    normalize_weights: bool
    rating_blind_encoder: bool
    normalize_loss: bool
    use_focal_loss: bool
    loss_num_layers: int
    use_step_loss: bool
    use_multi_step: bool
    multi_step_loss_num_epochs: int
    first_order: bool
    use_vmap: bool
    support_chunks: int | None
    recompute_inner_steps: int | None

    @property
    def method(self):
        """The method's name in file names and reports."""
        return "maml" if self.weighting in (None, "inverse_frequency") and not self.use_loss_network else "melo"

    @classmethod
    def from_args(cls, args):
        adaptive = args.use_adaptive_loss
        weighting = (("lstm" if args.use_lstm else "mlp" if args.use_mlp else None) if adaptive
                     else "inverse_frequency" if args.inverse_frequency_weights else None)
        use_loss_network = adaptive and (args.use_mlp_mean or (not args.use_lstm and not args.use_mlp))
        features = tuple(name for name, used in (("rating_mean", args.task_info_rating_mean),
                                                 ("rating_std", args.task_info_rating_std),
                                                 ("labels", args.task_info_labels),
                                                 ("predictions", args.task_info_predictions),
                                                 ("loss", args.task_info_loss)) if used)
        return _from_flags(cls, args, weighting=weighting, use_loss_network=use_loss_network,
                           task_info_features=features)


@dataclass(frozen=True)
class TrainingConfig:
    """main.py's outer loop: its length, batches and validations, and the learning rates of its
    optimisers (meta_learning/learning_rates.py)."""
    num_train_iterations: int
    batch_size: int
    tasks_per_pass: int | None
    log_interval: int
    outer_lr: float
    min_outer_lr: float
    lstm_lr: float
    learn_lr: float
    task_info_lr: float
    loss_lr: float
    loss_weight_decay: float
    compile: bool
    start_from: str | None   # Basic's "embedding" (--load_pretrained_embedding), "model" (--load_pretrained) or None

    @classmethod
    def from_args(cls, args):
        start_from = ("embedding" if args.load_pretrained_embedding else "model" if args.load_pretrained else None)
        return _from_flags(cls, args, start_from=start_from)


@dataclass(frozen=True)
class BasicConfig:
    """train_original.py: epochs, batches and learning rate, whether the loss is weighted by
    an LSTM encoder (``use_learned_loss_baseline``, of the encoder's sizes and rate), and
    whether the best epoch's embedding is saved for MAML and MELO."""
    pretrain_epochs: int
    pretraining_batch_size: int
    pretraining_lr: float
    normalize_loss: bool
    random_seed: int
    use_learned_loss_baseline: bool
    lstm_input_size: int
    lstm_hidden: int
    lstm_num_layers: int
    use_softmax: bool
    lstm_lr: float
    save_pretrained: bool

    @classmethod
    def from_args(cls, args):
        return _from_flags(cls, args)


@dataclass(frozen=True)
class RunFilesConfig:
    """Where a run's files go (Basic's under --pretrain_log_dir, the others' under --log_dir)
    and what they hold beside the numbers: ``flags`` is every flag, name -> value, from which
    run/run_files.py picks the settings that make a run's files its own (the flag table's
    ``identity``), and which its checkpoints and test results keep."""
    data_path: str
    mode: str
    model: str
    random_seed: int
    log_dir: str
    pretrain_log_dir: str
    checkpoint_step: int
    overwrite: bool
    bert_hidden_units: int   # the transformer's sizes name Basic's pretrained files
    bert_num_blocks: int
    bert_num_heads: int
    flags: Mapping[str, object]

    @classmethod
    def from_args(cls, args):
        return _from_flags(cls, args, flags=MappingProxyType(dict(vars(args))))


@dataclass(frozen=True)
class MetaRunConfig:
    """What main.py's MetaTrainer takes: the tasks, the recommender, the method, the outer
    loop and the run's files."""
    tasks: TaskConfig
    model: ModelConfig
    method: MethodConfig
    training: TrainingConfig
    files: RunFilesConfig

    @classmethod
    def from_args(cls, args, num_items):
        return cls(TaskConfig.from_args(args), ModelConfig.from_args(args, num_items), MethodConfig.from_args(args),
                   TrainingConfig.from_args(args), RunFilesConfig.from_args(args))


@dataclass(frozen=True)
class BasicRunConfig:
    """What train_original.py's BasicTrainer takes: its training, the tasks, the recommender
    and the run's files."""
    basic: BasicConfig
    tasks: TaskConfig
    model: ModelConfig
    files: RunFilesConfig

    @classmethod
    def from_args(cls, args, num_items):
        return cls(BasicConfig.from_args(args), TaskConfig.from_args(args), ModelConfig.from_args(args, num_items),
                   RunFilesConfig.from_args(args))
