"""Rating files -> users -> meta-learning tasks and pretraining sequences.

Pipeline of ``load_data(args)``:

1. find the file (MovieLens is downloaded into ``Data/ml-1m`` / ``Data/ml-10m`` when missing),
   detect its layout from its content, read it in chunks into integer-coded columns;
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

import contextlib
import csv
import gzip
import http.client
import io
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from options import MODES

MOVIELENS_URLS = {
    "ml-1m": "http://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-10m": "http://files.grouplens.org/datasets/movielens/ml-10m.zip",
}
DATA_ROOT = Path("Data")          # relative to the working directory, as in the reference
DOWNLOAD_TIMEOUT_S = 60.0
CHUNK_ROWS = 500_000              # rows held as raw text at once while reading
RATING_MIN, RATING_MAX = 0.5, 5.0  # accepted ratings: 0.5 .. 5 in half stars
TRAIN_FRACTION = 0.85             # of the non-test users; the rest are valid users

# Independent random streams, all derived from --random_seed.
_SPLIT_STREAM, _TRAIN_STREAM, _VALID_STREAM, _TEST_STREAM = range(1, 5)


class DataError(Exception):
    """Bad input data or settings; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------
# Input layouts
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where one input format keeps user, item, rating and date (column names or numbers)."""
    name: str
    user: str | int
    item: str | int
    rating: str | int
    date: str | int
    json_lines: bool = False
    sep: str = ","
    header: bool = True

    @property
    def source_fields(self) -> list[str | int]:
        return [self.user, self.item, self.rating, self.date]


# ``a::b::c::d`` read with ``:`` as separator (fast C parser): the values are fields 0, 2, 4, 6.
MOVIELENS_DAT = Layout("movielens-dat", 0, 2, 4, 6, sep=":", header=False)
MOVIELENS_CSV = Layout("movielens-csv", "userId", "movieId", "rating", "timestamp")
AMAZON_CSV = Layout("amazon-csv", "reviewerID", "product_id", "rating", "date")
YELP_CSV = Layout("yelp-csv", "user_id", "business_id", "stars", "timestamp")
AMAZON_RATINGS_CSV = Layout("amazon-ratings-csv", 0, 1, 2, 3, header=False)
JSON_LAYOUTS = (  # first match wins
    Layout("amazon-json", "reviewerID", "asin", "overall", "unixReviewTime", json_lines=True),
    Layout("amazon-2023-jsonl", "user_id", "parent_asin", "rating", "timestamp", json_lines=True),
    Layout("amazon-2023-jsonl", "user_id", "asin", "rating", "timestamp", json_lines=True),
    Layout("yelp-review-json", "user_id", "business_id", "stars", "date", json_lines=True),
)
HEADER_CSV_LAYOUTS = (AMAZON_CSV, YELP_CSV, MOVIELENS_CSV)
MODE_LAYOUTS = {"ml-1m": MOVIELENS_DAT, "ml-10m": MOVIELENS_DAT, "amazon": AMAZON_CSV,
                "yelp": YELP_CSV}
RAW_FORMATS_HELP = ("Amazon review JSON lines (reviewerID, asin, overall, unixReviewTime), "
                    "Amazon 2023 JSONL (user_id, parent_asin or asin, rating, timestamp), "
                    "Yelp review.json (user_id, business_id, stars, date), a MovieLens CSV "
                    "(userId,movieId,rating,timestamp) or a ratings-only CSV without header "
                    "(user,item,rating,timestamp)")


@contextlib.contextmanager
def open_text(path: Path):
    """Open a rating file as text: plain, gzip (.gz) or the one data file inside a .zip."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as stream:
            yield stream
    elif magic == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            member = _data_member(archive, path)
            with io.TextIOWrapper(archive.open(member), encoding="utf-8-sig", newline="") as stream:
                yield stream
    else:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            yield stream


def _data_member(archive: zipfile.ZipFile, path: Path) -> str:
    """The rating file inside a zip archive (its only file, or its only .csv/.json/.dat)."""
    names = [n for n in archive.namelist()
             if not n.endswith("/") and not PurePosixPath(n).name.startswith(".")
             and not n.startswith("__MACOSX/")]
    data_names = [n for n in names if n.lower().endswith((".csv", ".json", ".jsonl", ".dat"))]
    for candidates in (names, data_names):
        if len(candidates) == 1:
            return candidates[0]
    raise DataError(f"{path} is a zip archive with {len(names)} files ({', '.join(names[:5])}); "
                    "unzip it and point --data_path at the rating file")


def _first_line(stream) -> str:
    for line in stream:
        if line.strip():
            return line.strip()
    return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def detect_layout(path: Path, mode: str) -> Layout:
    """Which layout ``path`` is in, from its first line; ``mode`` only shapes the error."""
    try:
        with open_text(path) as stream:
            line = _first_line(stream)
    except (UnicodeDecodeError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataError(f"cannot read {path} as text: {error}") from None
    if not line:
        raise DataError(f"{path} is empty; point --data_path at a rating file")
    if line.startswith("{"):
        return _detect_json_layout(path, line)
    if "::" in line:
        return MOVIELENS_DAT
    header = [name.strip() for name in next(csv.reader([line]))]
    for layout in HEADER_CSV_LAYOUTS:
        if set(layout.source_fields) <= set(header):
            return layout
    if len(header) >= 4 and _is_number(header[2]) and _is_number(header[3]):
        return AMAZON_RATINGS_CSV
    expected = MODE_LAYOUTS[mode]
    raise DataError(
        f"{path}: the columns {header} do not match --mode={mode}: expected "
        f"{_describe(expected)}. Other accepted files: {RAW_FORMATS_HELP}. "
        "Rename the columns or choose the matching --mode")


def _detect_json_layout(path: Path, line: str) -> Layout:
    try:
        keys = set(json.loads(line))
    except (json.JSONDecodeError, TypeError):
        raise DataError(f"{path}: the first line starts with '{{' but is not JSON; JSON-lines files "
                        "need one JSON object per line (strict JSON, not Python literals)") from None
    for layout in JSON_LAYOUTS:
        if set(layout.source_fields) <= keys:
            return layout
    raise DataError(f"{path}: JSON fields {sorted(keys)} match no known layout; expected "
                    f"{RAW_FORMATS_HELP}")


def _describe(layout: Layout) -> str:
    if layout is MOVIELENS_DAT:
        return "MovieLens ratings.dat lines user::item::rating::timestamp"
    return f"a CSV with the columns {', '.join(map(str, layout.source_fields))}"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class _IdEncoder:
    """Codes id strings in order of first appearance; ``load_data`` re-codes them sorted."""

    def __init__(self):
        self.codes: dict[str, int] = {}

    def encode(self, ids: np.ndarray) -> np.ndarray:
        chunk_codes, uniques = pd.factorize(ids)
        table = self.codes
        global_codes = np.array([table.setdefault(u, len(table)) for u in uniques], dtype=np.int64)
        return global_codes[chunk_codes]

    def names(self) -> np.ndarray:
        return np.array(list(self.codes), dtype=object)


@dataclass
class RawRatings:
    """Usable rows of a rating file; ``user_codes`` index ``user_names`` (same for items)."""
    layout: str
    user_codes: np.ndarray   # int64[N]
    item_codes: np.ndarray   # int64[N]
    ratings: np.ndarray      # float32[N], stars
    dates: np.ndarray        # float64[N], sortable time (seconds, or ms for Amazon 2023)
    user_names: np.ndarray   # object[#users], original ids as strings
    item_names: np.ndarray   # object[#items]


def read_ratings(path: Path, mode: str) -> RawRatings:
    """Read the usable rows of ``path`` in chunks; print a warning counting the dropped rows."""
    layout = detect_layout(path, mode)
    users, items = _IdEncoder(), _IdEncoder()
    parts: list[tuple[np.ndarray, ...]] = []
    dropped: Counter[str] = Counter()   # rows dropped, by their first reason
    try:
        with open_text(path) as stream:
            chunks = _json_chunks(stream, layout, dropped) if layout.json_lines \
                else _csv_chunks(stream, layout)
            for user, item, rating, date in chunks:
                keep, stars, time = _usable_rows(user, item, rating, date, dropped)
                parts.append((users.encode(user[keep]), items.encode(item[keep]),
                              stars[keep], time[keep]))
    except (pd.errors.ParserError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path}: cannot parse it as {layout.name}: {error}") from None
    _report_dropped(path, sum(len(part[2]) for part in parts), dropped)
    user_codes, item_codes, ratings, dates = (np.concatenate(column) for column in zip(*parts))
    return RawRatings(layout.name, user_codes, item_codes, ratings.astype(np.float32), dates,
                      users.names(), items.names())


def _csv_chunks(stream, layout: Layout):
    """Yield (user, item, rating, date) string arrays of up to CHUNK_ROWS rows."""
    reader = pd.read_csv(stream, sep=layout.sep, header=0 if layout.header else None,
                         usecols=layout.source_fields, dtype=object, keep_default_na=False,
                         chunksize=CHUNK_ROWS)
    for chunk in reader:
        yield tuple(chunk[name].to_numpy() for name in layout.source_fields)


def _json_chunks(stream, layout: Layout, dropped: Counter):
    """Yield (user, item, rating, date) string arrays of up to CHUNK_ROWS JSON lines.

    Only the four fields of each line are kept (reviews' text is dropped line by line).
    """
    rows = []
    for line in stream:
        if not line.strip():
            continue
        row = _json_fields(line, layout.source_fields)
        if row is None:
            dropped["a line that is not JSON"] += 1
            continue
        rows.append(row)
        if len(rows) == CHUNK_ROWS:
            yield _string_columns(rows)
            rows = []
    if rows:
        yield _string_columns(rows)


def _string_columns(rows: list[tuple[str, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.array(column, dtype=object) for column in zip(*rows))


def _json_fields(line: str, names: list[str]) -> tuple[str, ...] | None:
    """The fields ``names`` of one JSON line as strings ('' when absent); None if not JSON."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    values = (record.get(name) for name in names)
    return tuple("" if value is None else str(value) for value in values)


def _usable_rows(user, item, rating, date, dropped: Counter):
    """Mask of usable rows, their ratings (float) and sortable dates (float); counts the rest."""
    stars = pd.to_numeric(rating, errors="coerce").astype(np.float64)
    time = _date_values(date)
    non_numeric = np.isnan(stars)
    off_scale = ~non_numeric & ((stars < RATING_MIN) | (stars > RATING_MAX)
                                | (stars * 2 != np.round(stars * 2)))
    keep = np.ones(len(stars), dtype=bool)
    for reason, rows in (("a missing user or item id", (user == "") | (item == "")),
                         ("a non-numeric rating", non_numeric),
                         (f"a rating outside {RATING_MIN:g}..{RATING_MAX:g} in half stars", off_scale),
                         ("a missing or unreadable date", np.isnan(time))):
        dropped[reason] += int((rows & keep).sum())   # each row counted under its first reason
        keep &= ~rows
    return keep, stars, time


def _date_values(date: np.ndarray) -> np.ndarray:
    """Numbers as they are (unix time); other text parsed as an ISO date, in seconds; else NaN."""
    values = pd.to_numeric(date, errors="coerce").astype(np.float64)
    text = np.isnan(values) & (date != "")
    if text.any():
        parsed = pd.to_datetime(pd.Series(date[text]), format="ISO8601", errors="coerce", utc=True)
        epoch = pd.Timestamp(0, tz="UTC")
        values[text] = (parsed - epoch).dt.total_seconds().to_numpy()
    return values


def _report_dropped(path: Path, usable: int, dropped: Counter) -> None:
    total = usable + sum(dropped.values())
    reasons = ", ".join(f"{count:,} with {reason}" for reason, count in dropped.items() if count)
    if usable == 0:
        raise DataError(f"{path}: none of its {total:,} rows is usable ({reasons or 'no rows'}); "
                        f"ratings must be numbers in {RATING_MIN:g}..{RATING_MAX:g}")
    if reasons:
        print(f"Warning: dropped {total - usable:,} of {total:,} rows of {path}: {reasons}")


# --------------------------------------------------------------------------------------
# MovieLens download
# --------------------------------------------------------------------------------------
def download_movielens(dataset: str, folder: Path, url: str | None = None,
                       timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``dataset`` (ml-1m or ml-10m) and unpack its files into ``folder``.

    The archive goes to a temporary folder beside ``folder``, is checked (zip CRCs, a
    ratings.dat member) and unpacked there; its files are then moved into ``folder`` with
    ratings.dat last, so a failed or interrupted download never leaves a ratings.dat behind.
    """
    url = url or MOVIELENS_URLS[dataset]
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dataset}-download-", dir=folder.parent))
    try:
        archive = work / f"{dataset}.zip"
        _fetch(url, archive, timeout, dataset, folder)
        unpacked = _unpack_checked(archive, work / "unpacked", url)
        _move_files(unpacked, folder, last="ratings.dat")
    except DataError as error:
        raise DataError(f"{error}. To get the data by hand, download {MOVIELENS_URLS[dataset]} "
                        f"elsewhere and unzip it so that {folder / 'ratings.dat'} exists (README, "
                        "section Datasets), or give a mirror with --download_url=URL") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(url: str, target: Path, timeout: float, dataset: str, folder: Path) -> None:
    """Stream ``url`` into ``target`` with a progress bar; DataError on any failure."""
    print(f"{folder / 'ratings.dat'} is missing: downloading {dataset} from {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=expected or None, unit="B", unit_scale=True, desc=dataset) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise DataError(f"downloading {url} failed: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:   # URLError, timeouts, cut connections
        reason = getattr(error, "reason", error)
        raise DataError(f"cannot download {url} (no network? {reason})") from None
    received = target.stat().st_size
    if expected and received != expected:
        raise DataError(f"the download of {url} stopped after {received:,} of {expected:,} bytes; "
                        "run again")


def _unpack_checked(archive: Path, target: Path, url: str) -> Path:
    """Check and unpack the zip; return the unpacked folder that holds ratings.dat."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            broken = zipped.testzip()
            if broken is not None:
                raise DataError(f"the archive from {url} is corrupt ({broken} fails its CRC "
                                "check); run again or use another --download_url")
            ratings = [n for n in zipped.namelist() if PurePosixPath(n).name == "ratings.dat"]
            if not ratings:
                raise DataError(f"the archive from {url} has no ratings.dat; is it a MovieLens zip?")
            zipped.extractall(target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(f"the archive from {url} is not a valid zip ({error}); it may be "
                        "truncated: run again or use another --download_url") from None
    return (target / ratings[0]).parent


def _move_files(source: Path, folder: Path, last: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in source.iterdir() if p.is_file()), key=lambda p: p.name == last)
    for file in files:
        os.replace(file, folder / file.name)


def _ensure_data_file(data_path: str, mode: str, download_url: str | None) -> Path:
    """The rating file to read; MovieLens is downloaded into Data/<mode>/ when missing there."""
    path = Path(data_path)
    if path.is_dir():
        raise DataError(f"--data_path={data_path} is a folder; point it at the rating file")
    if path.is_file():
        return path
    default_folder = DATA_ROOT / mode
    if mode in MOVIELENS_URLS and default_folder.resolve() in path.resolve().parents:
        download_movielens(mode, default_folder, download_url)
        if path.is_file():
            return path
        raise DataError(f"the {mode} archive has no {path.relative_to(default_folder)}; "
                        f"use --data_path={default_folder / 'ratings.dat'}")
    raise DataError(f"--data_path={data_path} does not exist. " + _missing_file_hint(mode))


def _missing_file_hint(mode: str) -> str:
    if mode in MOVIELENS_URLS:
        return (f"Point it at a MovieLens ratings.dat, or use --data_path=./Data/{mode}/ratings.dat, "
                "which is downloaded automatically (README, section Datasets)")
    return (f"Put {_describe(MODE_LAYOUTS[mode])} there (see Data/README.md and the README, "
            f"section Datasets), or point --data_path at one of: {RAW_FORMATS_HELP}")


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


def check_task_settings(args) -> None:
    """Fail early when tasks cannot be built with these settings."""
    if args.mode not in MODES:
        raise DataError(f"unknown --mode={args.mode}; choose one of {', '.join(MODES)}")
    if args.max_seq_len < 3:
        raise DataError(f"--max_seq_len={args.max_seq_len} is too short: a task needs a window "
                        "of 3 interactions for one query; raise it")
    if not 1 <= args.min_sub_window_size < args.max_seq_len:
        raise DataError(f"--min_sub_window_size={args.min_sub_window_size} must be in "
                        f"1..{args.max_seq_len - 1} (below --max_seq_len)")
    needed = min_window_length(args.min_sub_window_size)
    if args.min_sequence < needed:
        raise DataError(
            f"--min_sequence={args.min_sequence} is too small: a task needs at least {needed} "
            f"interactions (a support sequence of --min_sub_window_size="
            f"{args.min_sub_window_size} before the target, and a window of 3 for a query); raise "
            f"--min_sequence to {needed} or lower --min_sub_window_size")


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


def load_data(args) -> RatingData:
    """Read, filter, densify, sequence and split ``args.data_path``; print its statistics."""
    check_task_settings(args)
    path = _ensure_data_file(args.data_path, args.mode, getattr(args, "download_url", None))
    raw = read_ratings(path, args.mode)
    duplicates = _duplicate_rows(raw)
    if args.drop_duplicates:
        raw = _select_rows(raw, ~duplicates)
    keep = _filter_rows(raw, args.min_item, args.min_sequence)
    users, user_ids = _densify(raw.user_codes[keep], raw.user_names, first=0)
    items, item_ids = _densify(raw.item_codes[keep], raw.item_names, first=1)
    ratings, dates = raw.ratings[keep], raw.dates[keep]

    by_date = _date_order(dates, stable=args.stable_date_sort)
    order = by_date[np.argsort(users[by_date], kind="stable")]   # by user, then date
    lengths = np.bincount(users, minlength=len(user_ids))
    item_seqs = np.split(items[order], np.cumsum(lengths)[:-1])
    rating_seqs = np.split(ratings[order], np.cumsum(lengths)[:-1])

    train, valid, test = split_users(len(user_ids), args.num_test_data, args.val_size,
                                     args.random_seed)
    stats = compute_stats(lengths, ratings, len(item_ids), args.max_seq_len)
    stats.update(layout=raw.layout, path=str(path), max_seq_len=args.max_seq_len,
                 duplicate_rows=int(duplicates.sum()), duplicates_dropped=args.drop_duplicates,
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

    def __init__(self, data: RatingData, args):
        self.data = data
        self.sequences = _Sequences(data, args.max_seq_len, args.default_rating)
        self.max_seq_len = args.max_seq_len
        self.num_samples = args.num_samples
        self.num_query_set = args.num_query_set
        self.min_sub_window_size = args.min_sub_window_size
        self.min_sequence = args.min_sequence
        self.use_random_sequence_length = args.use_random_sequence_length
        self.random_seed = args.random_seed
        self.val_size = args.val_size
        self._max_support_windows = int(count_subwindows(args.max_seq_len - 1,
                                                         args.min_sub_window_size))
        self._rng = np.random.default_rng((args.random_seed, _TRAIN_STREAM))
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

    def __init__(self, data: RatingData, users: np.ndarray, args, seed: int = 0):
        self.users = np.asarray(users, dtype=np.int64)
        self.sequences = _Sequences(data, args.max_seq_len, args.default_rating)
        self.min_sub_window_size = args.min_sub_window_size
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
