"""Rating files: their layouts (MovieLens, Amazon, Yelp; CSV, JSON lines; plain, gzip or
zip), detected from the content, read in chunks into integer-coded columns, with the
unusable rows counted and dropped."""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

CHUNK_ROWS = 500_000              # rows held as raw text at once while reading
RATING_MIN, RATING_MAX = 0.5, 5.0  # accepted ratings: 0.5 .. 5 in half stars
OFF_SCALE = f"a rating outside {RATING_MIN:g}..{RATING_MAX:g} in half stars"
LATEST_DATE = 2.0 ** 62            # |date| beyond this (in any unit) would overflow the int64 sort key


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
# RecBole's atomic files: tab-separated, each header field ``name:type``
RECBOLE_INTER = Layout("recbole-inter", "user_id:token", "item_id:token", "rating:float", "timestamp:float",
                       sep="\t")
JSON_LAYOUTS = (  # first match wins
    Layout("amazon-json", "reviewerID", "asin", "overall", "unixReviewTime", json_lines=True),
    Layout("amazon-2023-jsonl", "user_id", "parent_asin", "rating", "timestamp", json_lines=True),
    Layout("amazon-2023-jsonl", "user_id", "asin", "rating", "timestamp", json_lines=True),
    Layout("yelp-review-json", "user_id", "business_id", "stars", "date", json_lines=True),
)
HEADER_CSV_LAYOUTS = (AMAZON_CSV, YELP_CSV, MOVIELENS_CSV, RECBOLE_INTER)
MODE_LAYOUTS = {"ml-1m": MOVIELENS_DAT, "ml-10m": MOVIELENS_DAT, "amazon": AMAZON_CSV,
                "yelp": YELP_CSV}
MODES = tuple(MODE_LAYOUTS)  # the --mode readers
RAW_FORMATS_HELP = ("Amazon review JSON lines (reviewerID, asin, overall, unixReviewTime), "
                    "Amazon 2023 JSONL (user_id, parent_asin or asin, rating, timestamp), "
                    "Yelp review.json (user_id, business_id, stars, date), a MovieLens CSV "
                    "(userId,movieId,rating,timestamp), a RecBole atomic .inter file (tab-separated "
                    "user_id:token, item_id:token, rating:float, timestamp:float) or a ratings-only "
                    "CSV without header (user,item,rating,timestamp)")


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
    except (UnicodeDecodeError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise DataError(f"cannot read {path} as text: {error}") from None
    if not line:
        raise DataError(f"{path} is empty; point --data_path at a rating file")
    if line.startswith("{"):
        return _detect_json_layout(path, line)
    if "::" in line:
        return MOVIELENS_DAT
    fields = line.split("\t") if "\t" in line else next(csv.reader([line]))
    header = [name.strip() for name in fields]
    for layout in HEADER_CSV_LAYOUTS:
        if set(layout.source_fields) <= set(header):
            return layout
    if len(header) >= 4 and _is_number(header[2]) and _is_number(header[3]):
        return AMAZON_RATINGS_CSV
    expected = MODE_LAYOUTS[mode]
    raise DataError(
        f"{path}: the columns {header} do not match --mode={mode}: expected "
        f"{describe_layout(expected)}. Other accepted files: {RAW_FORMATS_HELP}. "
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


def describe_layout(layout: Layout) -> str:
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
    found_scale = [np.inf, -np.inf]     # the lowest and highest numeric rating read
    try:
        with open_text(path) as stream:
            chunks = _json_chunks(stream, layout, dropped) if layout.json_lines \
                else _csv_chunks(stream, layout)
            for user, item, rating, date in chunks:
                keep, stars, time = _usable_rows(user, item, rating, date, dropped)
                if not np.isnan(stars).all():
                    found_scale = [min(found_scale[0], np.nanmin(stars)), max(found_scale[1], np.nanmax(stars))]
                parts.append((users.encode(user[keep]), items.encode(item[keep]),
                              stars[keep], time[keep]))
    except (pd.errors.ParserError, UnicodeDecodeError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile,
            zlib.error) as error:   # a damaged archive too
        raise DataError(f"{path}: cannot parse it as {layout.name}: {error}; if it is damaged, get it again") from None
    _report_dropped(path, sum(len(part[2]) for part in parts), dropped, found_scale)
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
                         (OFF_SCALE, off_scale),
                         ("a missing or unreadable date", np.isnan(time)),
                         (f"a date that is infinite or beyond ±{LATEST_DATE:.0e}", np.abs(time) > LATEST_DATE)):
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


def _report_dropped(path: Path, usable: int, dropped: Counter, found_scale: list[float]) -> None:
    """A warning that counts the rows dropped by reason; an error when none is usable, or when
    most ratings are off the scale (another scale, which the few on it would misrepresent)."""
    total = usable + sum(dropped.values())
    if dropped[OFF_SCALE] > total / 2:
        raise DataError(f"{path}: {dropped[OFF_SCALE]:,} of its {total:,} ratings are outside "
                        f"{RATING_MIN:g}..{RATING_MAX:g} (its ratings go from {found_scale[0]:g} to "
                        f"{found_scale[1]:g}): another rating scale; map it onto 1..5 stars first")
    reasons = ", ".join(f"{count:,} with {reason}" for reason, count in dropped.items() if count)
    if usable == 0:
        raise DataError(f"{path}: none of its {total:,} rows is usable ({reasons or 'no rows'}); "
                        f"ratings must be numbers in {RATING_MIN:g}..{RATING_MAX:g}")
    if reasons:
        print(f"Warning: dropped {total - usable:,} of {total:,} rows of {path}: {reasons}")

