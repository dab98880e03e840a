"""Rating files -> users -> meta-learning tasks and pretraining sequences.

Pipeline of ``load_data(config)`` (a config.DataConfig):

1. find the file (MovieLens is downloaded into ``Data/ml-1m`` / ``Data/ml-10m`` when missing:
   download.py), detect its layout from its content and read it in chunks into
   integer-coded columns (rating_files.py);
2. drop rows with an unusable rating, id or date (counted in a printed warning); count the
   rows that repeat an earlier one exactly, and drop them with ``drop_duplicates``;
3. filter once: items with fewer than ``min_item`` ratings, then users with fewer than
   ``min_sequence``;
4. densify with SORTED ids (users 0..U-1, items 1..I, 0 = padding): the same mapping in
   every process, whatever PYTHONHASHSEED is;
5. sequence each user's interactions by date, sorted as the reference sorts them (numpy's
   quicksort over the rows in file order; ``stable_date_sort`` keeps ties in file order);
6. split users: ``num_test_data`` test users drawn as the reference draws them
   (``RandomState(random_seed).choice`` over the users in id order), the rest 85/15 into
   train/valid with a generator derived from the same seed.

``TaskSampler`` turns users into task batches (one task = one user) with numpy index
arithmetic over one flat array of all sequences; ``PretrainDataset`` gives the Basic
recommender one random sub-window per user and epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import torch

# the readers and the download were part of this module: their public names import from it
from config import DataConfig, TaskConfig
from download import download_movielens, ensure_data_file
from rating_files import DataError, Layout, RawRatings, detect_layout, read_ratings

__all__ = ["DataError", "Layout", "PretrainDataset", "RatingData", "RawRatings", "TaskBatch", "TaskSampler",
           "detect_layout", "download_movielens", "load_data", "read_ratings", "split_users"]

TRAIN_FRACTION = 0.85             # of the non-test users; the rest are valid users

# Independent random streams, all derived from --random_seed.
_SPLIT_STREAM, _TRAIN_STREAM, _VALID_STREAM, _TEST_STREAM = range(1, 5)


# --------------------------------------------------------------------------------------
# Filter, densify, sequence, split
# --------------------------------------------------------------------------------------
def _duplicate_rows(raw: RawRatings) -> np.ndarray:
    """Rows that repeat an earlier row exactly: the same user, item, rating and date (bool[N])."""
    columns = {"user": raw.user_codes, "item": raw.item_codes, "rating": raw.ratings, "date": raw.dates}
    return pd.DataFrame(columns).duplicated().to_numpy()


def _select_rows(raw: RawRatings, rows: np.ndarray) -> RawRatings:
    return replace(raw, user_codes=raw.user_codes[rows], item_codes=raw.item_codes[rows],
                   ratings=raw.ratings[rows], dates=raw.dates[rows])


def _filter_rows(raw: RawRatings, min_item: int, min_sequence: int) -> np.ndarray:
    """Rows kept after dropping rare items, then short users (bool[N])."""
    item_counts = np.bincount(raw.item_codes)
    keep = item_counts[raw.item_codes] >= min_item
    if not keep.any():
        raise DataError(f"no item has --min_item={min_item} ratings (the most rated one has "
                        f"{item_counts.max()}); lower --min_item")
    user_counts = np.bincount(raw.user_codes[keep], minlength=len(raw.user_names))
    keep &= user_counts[raw.user_codes] >= min_sequence
    if not keep.any():
        raise DataError(f"no user has --min_sequence={min_sequence} ratings of the items kept by "
                        f"--min_item={min_item} (the most active one has {user_counts.max()}); "
                        "lower --min_sequence or --min_item")
    return keep


def _sortable_ids(names: np.ndarray) -> np.ndarray:
    """Ids as int64 when all are plain decimal numbers (no leading zeros), else as strings."""
    if pd.Series(names, dtype=object).str.fullmatch(r"0|[1-9][0-9]{0,17}").all():
        return names.astype(np.int64)
    return names.astype(str)


def _densify(codes: np.ndarray, names: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids first, first+1, ... in sorted order of the original ids, and those ids."""
    used = np.unique(codes)
    ids = _sortable_ids(names[used])
    order = np.argsort(ids, kind="stable")
    lookup = np.zeros(len(names), dtype=np.int64)
    lookup[used[order]] = np.arange(first, first + len(used))
    return lookup[codes], ids[order]


def _date_order(dates: np.ndarray, stable: bool) -> np.ndarray:
    """Order of the rows by date. The reference sorts its frame (rows in file order, integer
    timestamps) with pandas' default quicksort, which leaves ties in an order that depends on
    the algorithm, and numpy picks it by the CPU's vector instructions; the same call on
    the same integers repeats it on the same machine. ``stable`` keeps ties in file order."""
    if stable:
        return np.argsort(dates, kind="stable")
    whole = np.all(dates == np.round(dates))
    return np.argsort(dates.astype(np.int64) if whole else dates, kind="quicksort")


def split_users(num_users: int, num_test_data: int, val_size: int, seed: int):
    """Sorted (train, valid, test) user indices: test drawn with ``seed``, the rest 85/15.

    The test users are the reference's for the same seed: it seeds numpy's global
    generator and draws ``choice(num_users, num_test_data, replace=False)`` over its users
    in id order, which ``RandomState(seed)`` repeats without touching the global state.
    """
    if num_test_data >= num_users:
        raise DataError(f"--num_test_data={num_test_data} leaves no training users: there are "
                        f"{num_users} users after filtering; lower --num_test_data")
    test = np.random.RandomState(seed).choice(num_users, num_test_data, replace=False)
    rest = np.setdiff1d(np.arange(num_users), test)
    shuffled = np.random.default_rng((seed, _SPLIT_STREAM)).permutation(rest)
    num_train = round(TRAIN_FRACTION * len(rest))
    train, valid = np.sort(shuffled[:num_train]), np.sort(shuffled[num_train:])
    if val_size > len(valid):
        raise DataError(f"--val_size={val_size} is larger than the {len(valid)} validation users "
                        f"({1 - TRAIN_FRACTION:.0%} of the {len(rest)} non-test users); lower "
                        "--val_size or --num_test_data")
    return train, valid, np.sort(test)


def min_window_length(min_sub_window_size: int) -> int:
    """Shortest task window: one support sequence before the target, and |W| - 2 >= 1 queries."""
    return max(3, min_sub_window_size + 1)


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------
def rating_levels(ratings: np.ndarray) -> np.ndarray:
    """The rating scale: 1..5, or 0.5..5 in half stars when any rating is a half star."""
    if np.all(ratings == np.round(ratings)):
        return np.arange(1.0, 6.0)
    return np.arange(1, 11) / 2.0


def balance_score(ratings: np.ndarray) -> float:
    """Normalised entropy H(p) / ln K of the rating histogram over the K levels of the scale.

    1 = every level equally frequent, 0 = all ratings equal.
    """
    levels = rating_levels(ratings)
    counts = np.array([(ratings == level).sum() for level in levels], dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(levels)))


def compute_stats(lengths: np.ndarray, ratings: np.ndarray, num_items: int,
                  max_seq_len: int) -> dict:
    """Statistics of users with sequence ``lengths`` [U] and all their ``ratings`` [N]."""
    values, counts = np.unique(ratings, return_counts=True)
    return {
        "num_users": len(lengths),
        "num_items": num_items,
        "num_ratings": int(lengths.sum()),
        "avg_seq_len": float(np.minimum(lengths, max_seq_len).mean()),
        "avg_full_seq_len": float(lengths.mean()),
        "rating_counts": {float(v): int(c) for v, c in zip(values, counts)},
        "balance_score": balance_score(ratings),
    }


def _format_duplicates(stats: dict) -> str:
    count = stats.get("duplicate_rows", 0)
    if not count:
        return ""
    what = ("dropped (--drop_duplicates=True)" if stats["duplicates_dropped"] else
            "kept, as the reference keeps them; --drop_duplicates=True drops them")
    return f"  {count:,} rows repeat an earlier row exactly (user, item, rating, date): {what}\n"


def format_stats(stats: dict) -> str:
    total = stats["num_ratings"]
    distribution = " | ".join(f"{value:g}: {count / total:.1%}"
                              for value, count in stats["rating_counts"].items())
    return (f"Data ({stats['layout']}, {stats['path']}): {stats['num_users']:,} users, "
            f"{stats['num_items']:,} items, {total:,} ratings\n"
            f"  average length {stats['avg_seq_len']:.1f} (truncated to max_seq_len="
            f"{stats['max_seq_len']}; {stats['avg_full_seq_len']:.1f} untruncated)\n"
            f"  ratings {distribution}\n"
            f"  balance score {stats['balance_score']:.3f} (normalised entropy of the ratings)\n"
            f"{_format_duplicates(stats)}"
            f"  users: {stats['num_train_users']:,} train, {stats['num_valid_users']:,} valid, "
            f"{stats['num_test_users']:,} test")


# --------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------
@dataclass
class RatingData:
    """Users as date-ordered sequences. Dense item k is original ``item_ids[k - 1]``."""
    item_seqs: list[np.ndarray]     # per user: int64[n_u], items 1..num_items
    rating_seqs: list[np.ndarray]   # per user: float32[n_u], stars
    num_users: int
    num_items: int
    user_ids: np.ndarray            # [num_users] original ids (int64 or str), sorted
    item_ids: np.ndarray            # [num_items] original ids (int64 or str), sorted
    train_users: np.ndarray         # int64, sorted
    valid_users: np.ndarray
    test_users: np.ndarray
    rating_values: np.ndarray       # sorted distinct ratings
    train_mean_rating: float
    stats: dict


def load_data(config: DataConfig) -> RatingData:
    """Read, filter, densify, sequence and split ``config.data_path``; print its statistics."""
    path = ensure_data_file(config.data_path, config.mode, config.download_url)
    raw = read_ratings(path, config.mode)
    duplicates = _duplicate_rows(raw)
    if config.drop_duplicates:
        raw = _select_rows(raw, ~duplicates)
    keep = _filter_rows(raw, config.min_item, config.min_sequence)
    users, user_ids = _densify(raw.user_codes[keep], raw.user_names, first=0)
    items, item_ids = _densify(raw.item_codes[keep], raw.item_names, first=1)
    ratings, dates = raw.ratings[keep], raw.dates[keep]

    by_date = _date_order(dates, stable=config.stable_date_sort)
    order = by_date[np.argsort(users[by_date], kind="stable")]   # by user, then date
    lengths = np.bincount(users, minlength=len(user_ids))
    item_seqs = np.split(items[order], np.cumsum(lengths)[:-1])
    rating_seqs = np.split(ratings[order], np.cumsum(lengths)[:-1])

    train, valid, test = split_users(len(user_ids), config.num_test_data, config.val_size,
                                     config.random_seed)
    stats = compute_stats(lengths, ratings, len(item_ids), config.max_seq_len)
    stats.update(layout=raw.layout, path=str(path), max_seq_len=config.max_seq_len,
                 duplicate_rows=int(duplicates.sum()), duplicates_dropped=config.drop_duplicates,
                 num_train_users=len(train), num_valid_users=len(valid), num_test_users=len(test))
    print(format_stats(stats))
    return RatingData(
        item_seqs=item_seqs, rating_seqs=rating_seqs, num_users=len(user_ids),
        num_items=len(item_ids), user_ids=user_ids, item_ids=item_ids,
        train_users=train, valid_users=valid, test_users=test,
        rating_values=np.array(list(stats["rating_counts"]), dtype=np.float32),
        train_mean_rating=float(np.concatenate([rating_seqs[u] for u in train]).mean()),
        stats=stats)


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------
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
    def support_row_mask(self) -> torch.Tensor:   # float[T, S], 1 for real support rows
        return (self.support_items[..., -1] != 0).float()

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
        self._rng = np.random.default_rng((config.random_seed, _TRAIN_STREAM))
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
                rng = np.random.default_rng((self.random_seed, _VALID_STREAM))
                users = np.sort(rng.choice(self.data.valid_users, self.val_size, replace=False))
            elif split == "test":
                rng = np.random.default_rng((self.random_seed, _TEST_STREAM))
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
