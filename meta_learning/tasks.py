"""Users -> meta-learning tasks, and Basic's training sequences.

``TaskSampler`` turns users into task batches (one task = one user) with numpy index
arithmetic over one flat array of all sequences: a window of the user's history (random for
training, the last one for valid and test), query suffixes of it that end with its target,
and support sub-windows before that target. ``PretrainDataset`` gives the Basic recommender
one random sub-window per user and epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from config import TaskConfig
from dataloader import TEST_STREAM, TRAIN_STREAM, VALID_STREAM, RatingData


@dataclass
class TaskBatch:
    """T tasks; every row is left-padded to L and ends with its target. Padding: item 0."""
    users: torch.Tensor             # LongTensor[T]
    support_items: torch.Tensor     # LongTensor[T, S, L]
    support_ratings: torch.Tensor   # FloatTensor[T, S, L], stars (default_rating at padding)
    query_items: torch.Tensor       # LongTensor[T, Q, L]
    query_ratings: torch.Tensor     # FloatTensor[T, Q, L]

    @property
    def support_mask(self) -> torch.Tensor:   # float[T, S, L], 1 at real positions
        return (self.support_items != 0).float()

    @property
    def query_mask(self) -> torch.Tensor:     # float[T, Q, L]
        return (self.query_items != 0).float()

    @property
    def query_row_mask(self) -> torch.Tensor:     # float[T, Q], 1 for real query rows
        return (self.query_items[..., -1] != 0).float()

    @property
    def target_ratings(self) -> torch.Tensor:     # float[T, Q], rating of each query's target
        return self.query_ratings[..., -1]

    def to(self, device) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index) -> TaskBatch:
        """Tasks ``index`` (a slice, an index array or tensor; an int keeps the T axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 or None)
        return TaskBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def count_subwindows(span, min_length):
    """Contiguous sub-windows of at least ``min_length`` in a sequence of ``span`` (>= min_length)."""
    longest_first_groups = span - min_length + 1
    return longest_first_groups * (longest_first_groups + 1) // 2


def subwindow_at(flat_index, span):
    """(offset, length) of sub-window number ``flat_index`` of a sequence of length ``span``.

    Numbering runs longest first: index 0 is the whole span, 1..2 the two of length span-1,
    then the three of length span-2, ... so indices below count_subwindows(span, k) are exactly
    the sub-windows of length >= k. Works elementwise on integer arrays.
    """
    group = ((np.sqrt(8 * np.asarray(flat_index, dtype=np.float64) + 1) - 1) // 2).astype(np.int64)
    offset = flat_index - group * (group + 1) // 2
    return offset, span - group


def _random_subsets(rng: np.random.Generator, counts: np.ndarray, max_count: int, size: int):
    """Per row, up to ``size`` distinct picks from range(counts[t]), uniformly, in random order.

    Returns picks int64[T, size] and real bool[T, size] (real picks first, then padding).
    """
    keys = rng.random((len(counts), max_count))                  # [T, max_count]
    keys[np.arange(max_count) >= counts[:, None]] = np.inf
    picks = np.argsort(keys, axis=1)[:, :size]
    if picks.shape[1] < size:
        picks = np.pad(picks, ((0, 0), (0, size - picks.shape[1])))
    real = np.arange(size) < np.minimum(counts, size)[:, None]
    return picks, real


class _Sequences:
    """All users' sequences in one flat array, for gathering padded rows by index arithmetic."""

    def __init__(self, data: RatingData, max_seq_len: int, default_rating: float):
        self.items = np.concatenate(data.item_seqs)                  # int64[N]
        self.ratings = np.concatenate(data.rating_seqs)              # float32[N]
        self.lengths = np.array([len(s) for s in data.item_seqs])    # [U]
        self.offsets = np.cumsum(self.lengths) - self.lengths        # [U], start of each user
        self.max_seq_len = max_seq_len
        self.default_rating = np.float32(default_rating)

    def gather(self, starts: np.ndarray, lengths: np.ndarray):
        """Rows flat[start : start+length], left-padded to L: items int64[..., L], ratings [..., L].

        Rows of length 0 are all padding.
        """
        position = np.arange(self.max_seq_len) - self.max_seq_len + lengths[..., None]
        real = position >= 0                                          # [..., L]
        index = np.where(real, starts[..., None] + position, 0)
        items = np.where(real, self.items[index], 0)
        ratings = np.where(real, self.ratings[index], self.default_rating)
        return items, ratings


class TaskSampler:
    """Meta-learning tasks (one per user) as TaskBatches of fixed shape [T, S|Q, L], drawn as
    the reference draws them.

    Window W of a task: at most L = max_seq_len consecutive interactions, at a random position
    for train tasks, the user's last L for valid/test tasks. With ``use_random_sequence_length``
    a train window is then cut to a random length in [min_sequence, |W|] at a random offset.
    Query: min(num_query_set, |W| - 2) suffixes of W whose lengths are drawn uniformly from
    [min_sub_window_size, |W|] with replacement, all ending with W's last interaction, the
    target. Support: up to num_samples distinct contiguous sub-windows of W[:-1] of length
    >= min_sub_window_size, uniformly without replacement.
    """

    def __init__(self, data: RatingData, config: TaskConfig):
        self.data = data
        self.sequences = _Sequences(data, config.max_seq_len, config.default_rating)
        self.max_seq_len = config.max_seq_len
        self.num_samples = config.num_samples
        self.num_query_set = config.num_query_set
        self.min_sub_window_size = config.min_sub_window_size
        self.min_sequence = config.min_sequence
        self.use_random_sequence_length = config.use_random_sequence_length
        self.random_seed = config.random_seed
        self.val_size = config.val_size
        self._max_support_windows = int(count_subwindows(config.max_seq_len - 1,
                                                         config.min_sub_window_size))
        self._rng = np.random.default_rng((config.random_seed, TRAIN_STREAM))
        self._epoch_order = np.empty(0, dtype=np.int64)   # training users of this epoch
        self._cursor = 0                                  # next position in _epoch_order
        self._fixed: dict[str, TaskBatch] = {}

    # ---- train stream -----------------------------------------------------------------
    def train_batch(self, batch_size: int) -> TaskBatch:
        """``batch_size`` tasks of the next training users (shuffled epochs over all of them)."""
        users = self._next_train_users(batch_size)
        return self._tasks(users, self._rng, last_window=False)

    def _next_train_users(self, batch_size: int) -> np.ndarray:
        picked = []
        while batch_size > 0:
            if self._cursor == len(self._epoch_order):
                self._epoch_order = self._rng.permutation(self.data.train_users)
                self._cursor = 0
            taken = self._epoch_order[self._cursor:self._cursor + batch_size]
            self._cursor += len(taken)
            batch_size -= len(taken)
            picked.append(taken)
        return np.concatenate(picked)

    def state_dict(self) -> dict:
        """Position of the train stream (plain types and a tensor: fits torch.save/load)."""
        return {"rng": self._rng.bit_generator.state,
                "epoch_order": torch.from_numpy(self._epoch_order.copy()),
                "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._epoch_order = np.asarray(state["epoch_order"], dtype=np.int64)
        self._cursor = int(state["cursor"])

    # ---- fixed valid/test tasks -------------------------------------------------------
    def fixed_tasks(self, split: str) -> TaskBatch:
        """The fixed tasks of 'valid' (val_size users) or 'test' (all test users).

        Determined by random_seed and the data alone (not by the train stream), so every
        script and every sampler instance gets the same users and the same sequences.
        """
        if split not in self._fixed:
            if split == "valid":
                rng = np.random.default_rng((self.random_seed, VALID_STREAM))
                users = np.sort(rng.choice(self.data.valid_users, self.val_size, replace=False))
            elif split == "test":
                rng = np.random.default_rng((self.random_seed, TEST_STREAM))
                users = self.data.test_users
            else:
                raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
            self._fixed[split] = self._tasks(users, rng, last_window=True)
        return self._fixed[split]

    # ---- task construction ------------------------------------------------------------
    def _tasks(self, users: np.ndarray, rng: np.random.Generator, last_window: bool) -> TaskBatch:
        window_starts, window_lengths = self._windows(users, rng, last_window)   # [T], [T]
        query_starts, query_lengths = self._query_rows(window_starts, window_lengths, rng)
        support_starts, support_lengths = self._support_rows(window_starts, window_lengths, rng)
        support_items, support_ratings = self.sequences.gather(support_starts, support_lengths)
        query_items, query_ratings = self.sequences.gather(query_starts, query_lengths)
        return TaskBatch(users=torch.from_numpy(np.asarray(users, dtype=np.int64)),
                         support_items=torch.from_numpy(support_items),
                         support_ratings=torch.from_numpy(support_ratings),
                         query_items=torch.from_numpy(query_items),
                         query_ratings=torch.from_numpy(query_ratings))

    def _windows(self, users, rng, last_window: bool):
        """Flat start and length of each task's window W."""
        lengths = self.sequences.lengths[users]
        window_lengths = np.minimum(lengths, self.max_seq_len)
        if last_window:
            return self.sequences.offsets[users] + lengths - window_lengths, window_lengths
        starts = self.sequences.offsets[users] + rng.integers(0, lengths - window_lengths + 1)
        if self.use_random_sequence_length:
            cut_lengths = rng.integers(np.minimum(self.min_sequence, window_lengths), window_lengths + 1)
            starts = starts + rng.integers(0, window_lengths - cut_lengths + 1)
            window_lengths = cut_lengths
        return starts, window_lengths

    def _query_rows(self, window_starts, window_lengths, rng):
        """Suffixes of W of lengths in [min_sub_window_size, |W|], drawn with replacement:
        starts, lengths [T, Q] (length 0 for the rows past min(num_query_set, |W| - 2))."""
        size = (len(window_lengths), self.num_query_set)
        lengths = rng.integers(self.min_sub_window_size, window_lengths[:, None] + 1, size=size)
        num_queries = np.minimum(self.num_query_set, window_lengths - 2)
        lengths = np.where(np.arange(self.num_query_set) < num_queries[:, None], lengths, 0)
        return (window_starts + window_lengths)[:, None] - lengths, lengths

    def _support_rows(self, window_starts, window_lengths, rng):
        """Distinct sub-windows of W[:-1] of length >= min_sub_window_size: starts, lengths [T, S]."""
        spans = window_lengths - 1
        counts = count_subwindows(spans, self.min_sub_window_size)
        picks, real = _random_subsets(rng, counts, self._max_support_windows, self.num_samples)
        offsets, lengths = subwindow_at(picks, spans[:, None])
        return window_starts[:, None] + offsets, np.where(real, lengths, 0)


# --------------------------------------------------------------------------------------
# Pretraining (Basic)
# --------------------------------------------------------------------------------------
class PretrainDataset(torch.utils.data.Dataset):
    """One random sequence per user and visit, as the reference's pretraining does.

    A window of at most L = max_seq_len interactions at a random position, then a sub-window
    of random length in [min_sub_window_size, |window|] at a random position inside it,
    left-padded to L. Randomness from ``np.random.default_rng(seed)``; with DataLoader
    workers every worker holds a copy of that generator, so use num_workers=0.
    """

    def __init__(self, data: RatingData, users: np.ndarray, config: TaskConfig, seed: int = 0):
        self.users = np.asarray(users, dtype=np.int64)
        self.sequences = _Sequences(data, config.max_seq_len, config.default_rating)
        self.min_sub_window_size = config.min_sub_window_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int):
        """(items LongTensor[L], ratings FloatTensor[L]) of one user."""
        user = self.users[index]
        length = self.sequences.lengths[user]
        window_length = min(length, self.sequences.max_seq_len)
        window_start = self.rng.integers(0, length - window_length + 1)
        row_length = self.rng.integers(self.min_sub_window_size, window_length + 1)
        row_start = window_start + self.rng.integers(0, window_length - row_length + 1)
        items, ratings = self.sequences.gather(
            np.asarray(self.sequences.offsets[user] + row_start), np.asarray(row_length))
        return torch.from_numpy(items), torch.from_numpy(ratings)
