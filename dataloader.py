"""Rating files -> users: read, filtered, sequenced by date and split (meta_learning/tasks.py makes tasks of them).

Pipeline of ``load_data(config)`` (a config.DataConfig):

1. find the file (MovieLens is downloaded into ``Data/ml-1m`` / ``Data/ml-10m`` when missing:
   ratings/download.py), detect its layout from its content and read it in chunks into
   integer-coded columns (ratings/rating_files.py);
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
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from config import DataConfig
from ratings.download import ensure_data_file
from ratings.rating_files import DataError, RawRatings, read_ratings

TRAIN_FRACTION = 0.85             # of the non-test users; the rest are valid users

# Independent random streams, all derived from --random_seed: the user split here, the
# training tasks and the fixed valid and test tasks in meta_learning/tasks.py.
SPLIT_STREAM, TRAIN_STREAM, VALID_STREAM, TEST_STREAM = range(1, 5)


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
    shuffled = np.random.default_rng((seed, SPLIT_STREAM)).permutation(rest)
    num_train = round(TRAIN_FRACTION * len(rest))
    train, valid = np.sort(shuffled[:num_train]), np.sort(shuffled[num_train:])
    if val_size > len(valid):
        raise DataError(f"--val_size={val_size} is larger than the {len(valid)} validation users "
                        f"({1 - TRAIN_FRACTION:.0%} of the {len(rest)} non-test users); lower "
                        "--val_size or --num_test_data")
    return train, valid, np.sort(test)


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
    digest: str                     # of the sequences (sequences_digest): which data the tasks come from


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
        stats=stats, digest=sequences_digest(items[order], ratings[order], lengths))


def sequences_digest(items, ratings, lengths) -> str:
    """16 hex digits of the sha256 of every user's items and ratings in sequence order: equal
    for two loads exactly when they make the same sequences — what a checkpoint and a record
    are checked against (the same file and flags can sequence otherwise on another CPU:
    ``_date_order``)."""
    digest = hashlib.sha256()
    for array in (items.astype(np.int64), ratings.astype(np.float64), lengths.astype(np.int64)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
