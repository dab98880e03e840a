"""Small seeded rating files in every input format, and a loopback HTTP server for downloads.

    frame = make_ratings_frame(num_users=60, num_items=80, seed=0)
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", frame)
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", num_users=60, seed=1)  # same, shorter

``frame`` has columns user, item, rating, timestamp (unix seconds), rows in file order.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import threading
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from config import DataConfig, MethodConfig, ModelConfig, TaskConfig
from dataloader import load_data
from meta_learning.meta_learner import MetaLearner
from meta_learning.tasks import TaskSampler
from models import model_factory
from options import parse_args

# format name -> the --mode that reads it (raw formats are detected under any mode)
FORMAT_MODES = {
    "ml-1m": "ml-1m",
    "ml-10m": "ml-10m",
    "ml-latest-csv": "ml-10m",
    "amazon": "amazon",
    "yelp": "yelp",
    "yelp-zip": "yelp",
    "amazon-json": "amazon",
    "amazon-json-gz": "amazon",
    "amazon-2023-jsonl": "amazon",
    "amazon-ratings-csv": "amazon",
    "yelp-review-json": "yelp",
    "recbole-inter": "amazon",
}
FORMATS = tuple(FORMAT_MODES)
FILE_NAMES = {"ml-1m": "ratings.dat", "ml-10m": "ratings.dat", "yelp-zip": "yelp.zip",
              "amazon-json": "reviews.json", "amazon-json-gz": "reviews.json.gz",
              "amazon-2023-jsonl": "reviews.jsonl", "yelp-review-json": "review.json",
              "recbole-inter": "ratings.inter"}

STAR_PROBABILITIES = [0.06, 0.11, 0.27, 0.34, 0.22]            # 1..5, MovieLens-like skew
HALF_STAR_PROBABILITIES = [0.014, 0.028, 0.018, 0.075, 0.055,   # 0.5..5, ml-latest-like
                           0.199, 0.130, 0.266, 0.085, 0.130]


def file_name(fmt: str) -> str:
    """A usual file name for ``fmt``."""
    return FILE_NAMES.get(fmt, "ratings.csv")


def make_ratings_frame(num_users: int = 60, num_items: int = 80, seed: int = 0,
                       half_stars: bool = False, string_ids: bool = False) -> pd.DataFrame:
    """Ratings of users with 5..40 distinct items each (popular items more often), shuffled.

    Timestamps repeat within a user now and then (ties must keep file order). With
    ``string_ids`` users are 'U0042'-like and items zero-padded digit strings ('0000000042').
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    levels, probabilities = ((np.arange(1, 11) / 2, HALF_STAR_PROBABILITIES) if half_stars
                             else (np.arange(1, 6).astype(float), STAR_PROBABILITIES))
    rows = []
    for user in range(num_users):
        count = min(int(rng.integers(5, 41)), num_items)
        items = rng.choice(num_items, count, replace=False, p=popularity)
        ratings = rng.choice(levels, count, p=probabilities)
        steps = rng.integers(0, 3, count) * 86_400                   # 0 = same second as before
        times = 900_000_000 + int(rng.integers(0, 10**8)) + np.cumsum(steps)
        rows += [(user, item, rating, t) for item, rating, t in zip(items, ratings, times)]
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    if string_ids:
        frame["user"] = [f"U{u:04d}" for u in frame.user]
        frame["item"] = [f"{i:010d}" for i in frame.item]
    else:
        frame["user"] += 1
        frame["item"] += 1
    return frame


def _iso(timestamp) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _stars(rating) -> str:
    return f"{rating:g}"


def movielens_dat(frame: pd.DataFrame) -> str:
    return "".join(f"{r.user}::{r.item}::{_stars(r.rating)}::{r.timestamp}\n"
                   for r in frame.itertuples())


def _csv_text(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "ml-latest-csv":
        table = pd.DataFrame({"userId": frame.user, "movieId": frame.item,
                              "rating": frame.rating.map("{:.1f}".format),
                              "timestamp": frame.timestamp})
        return table.to_csv(index=False)
    if fmt == "amazon":
        table = pd.DataFrame({"rating": frame.rating.map(_stars), "reviewerID": frame.user,
                              "product_id": frame.item, "date": frame.timestamp})
        return table.to_csv(index=False)
    if fmt in ("yelp", "yelp-zip"):
        table = pd.DataFrame({"stars": frame.rating.map(_stars), "user_id": frame.user,
                              "business_id": frame.item,
                              "timestamp": frame.timestamp.map(_iso)})
        return table.to_csv(index=False)
    if fmt == "amazon-ratings-csv":
        table = pd.DataFrame({"user": frame.user, "item": frame.item,
                              "rating": frame.rating.map("{:.1f}".format),
                              "timestamp": frame.timestamp})
        return table.to_csv(index=False, header=False)
    if fmt == "recbole-inter":   # an extra field, and the rating after the timestamp
        table = pd.DataFrame({"user_id:token": frame.user, "item_id:token": frame.item,
                              "timestamp:float": frame.timestamp, "label:float": 1.0,
                              "rating:float": frame.rating.map("{:.1f}".format)})
        return table.to_csv(index=False, sep="\t")
    raise ValueError(f"not a CSV format: {fmt}")


def _json_records(frame: pd.DataFrame, fmt: str) -> list[dict]:
    records = []
    for r in frame.itertuples():
        user, item, rating, t = r.user, r.item, float(r.rating), int(r.timestamp)
        if fmt in ("amazon-json", "amazon-json-gz"):
            records.append({"overall": rating, "verified": True, "reviewTime": _iso(t)[:10],
                            "reviewerID": user, "asin": item, "reviewText": "Fine, \"quoted\".",
                            "unixReviewTime": t})
        elif fmt == "amazon-2023-jsonl":
            records.append({"rating": rating, "title": "ok", "text": "line\nbreak",
                            "asin": f"V{item}", "parent_asin": item, "user_id": user,
                            "timestamp": t * 1000, "verified_purchase": True})
        elif fmt == "yelp-review-json":
            records.append({"review_id": f"r{r.Index}", "user_id": user, "business_id": item,
                            "stars": rating, "useful": 0, "text": "Nice.", "date": _iso(t)})
        else:
            raise ValueError(f"not a JSON format: {fmt}")
    return records


def write_ratings(path, fmt: str, frame: pd.DataFrame | None = None, **frame_options) -> Path:
    """Write ``frame`` to ``path`` in ``fmt`` (one of FORMATS); rows keep the frame's order.

    Without ``frame``, writes ``make_ratings_frame(**frame_options)``.
    """
    if frame is None:
        frame = make_ratings_frame(**frame_options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("ml-1m", "ml-10m"):
        path.write_text(movielens_dat(frame))
    elif fmt == "yelp-zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("yelp_ratings.csv", _csv_text(frame, fmt))
    elif fmt in ("ml-latest-csv", "amazon", "yelp", "amazon-ratings-csv", "recbole-inter"):
        path.write_text(_csv_text(frame, fmt))
    elif fmt in FORMAT_MODES:
        text = "".join(json.dumps(record) + "\n" for record in _json_records(frame, fmt))
        if fmt == "amazon-json-gz":
            with gzip.open(path, "wt", encoding="utf-8") as out:
                out.write(text)
        else:
            path.write_text(text)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return path


def movielens_zip(frame: pd.DataFrame, folder: str = "ml-1m") -> bytes:
    """A MovieLens-like zip: ``folder``/ratings.dat (from ``frame``), movies.dat, README."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/ratings.dat", movielens_dat(frame))
        archive.writestr(f"{folder}/movies.dat", "1::Toy Story (1995)::Animation\n")
        archive.writestr(f"{folder}/README", "Test archive.\n")
    return buffer.getvalue()


@dataclass
class Payload:
    """A response body; ``content_length`` may claim more bytes than are sent (a cut download)."""
    body: bytes
    content_length: int | None = None
    delay_s: float = 0.0


@contextlib.contextmanager
def loopback_server(routes: dict[str, bytes | Payload]):
    """Serve ``routes`` (URL path -> body) on 127.0.0.1; yields the base URL. Others get 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            payload = routes.get(self.path)
            if payload is None:
                self.send_error(404, "Not Found")
                return
            if isinstance(payload, bytes):
                payload = Payload(payload)
            time.sleep(payload.delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(payload.content_length or len(payload.body)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):      # the client may give up first
                self.wfile.write(payload.body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_dir(root):
    """The one run folder (run_files.run_folder) under a --log_dir or --pretrain_log_dir."""
    folders = [path for path in Path(root).iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


# --- a tiny meta-learner on such data ------------------------------------------------------------
TINY = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8",
        "--num_samples=4", "--num_query_set=2", "--batch_size=4", "--bert_hidden_units=8",
        "--bert_num_blocks=1", "--bert_num_heads=2", "--gru4rec_hidden_size=8",
        "--gru4rec_embedding_dim=8", "--gru4rec_n_layers=1", "--narm_hidden_size=8",
        "--narm_embedding_dim=8", "--lstm_hidden=8", "--lstm_input_size=4"]


def tiny_args(ratings_file, *extra):
    return parse_args([f"--data_path={ratings_file}", *TINY, *extra])


def tiny_learner(ratings_file, *extra, dtype=torch.float32):
    """The flags, a MetaLearner of ``dtype`` and a batch of 3 training tasks."""
    args = tiny_args(ratings_file, *extra)
    data = load_data(DataConfig.from_args(args))
    learner = MetaLearner(model_factory(ModelConfig.from_args(args, data.num_items)),
                          MethodConfig.from_args(args)).to(dtype)
    batch = TaskSampler(data, TaskConfig.from_args(args)).train_batch(3)
    batch.support_ratings, batch.query_ratings = (batch.support_ratings.to(dtype),
                                                  batch.query_ratings.to(dtype))
    return args, learner, batch


METHOD_FLAGS = {"maml": ["--use_adaptive_loss=False"], "melo": [],
                "melo-mlp": ["--use_lstm=False", "--use_mlp=True", "--use_mlp_mean=True"],
                "melo-variants": ["--use_focal_loss=True", "--use_softmax=True", "--normalize_loss=False",
                                  "--use_mlp_mean=True", "--use_step_loss=False",
                                  "--normalize_weights=False"]}


def make_args(data_path, mode="ml-1m", *flags):
    """Small-data settings; later flags override earlier ones."""
    return parse_args(["--data_path", str(data_path), f"--mode={mode}", "--min_item=1",
                       "--min_sequence=5", "--num_test_data=5", "--val_size=3", *flags])


def expected_sequences(frame, min_item, min_sequence, kind="stable"):
    """{original user: (items, ratings)}: filter items, then users, sort by date with pandas
    (``kind="quicksort"`` is the reference's ``sort_values``; "stable" keeps ties in file order)."""
    frame = frame[frame.item.map(frame.item.value_counts()) >= min_item]
    frame = frame[frame.user.map(frame.user.value_counts()) >= min_sequence]
    frame = frame.sort_values("timestamp", kind=kind)
    return {user: (list(group.item), list(group.rating)) for user, group in frame.groupby("user")}


def loaded_sequences(data):
    return {data.user_ids[u].item(): (list(data.item_ids[items - 1]), list(data.rating_seqs[u]))
            for u, items in enumerate(data.item_seqs)}


def sequence_frame(lengths):
    """User k rates items 1..lengths[k] in order, one per day; ratings cycle 1..5."""
    rows = [(user + 1, item + 1, float(item % 5 + 1), 1_000_000 + 86_400 * item)
            for user, length in enumerate(lengths) for item in range(length)]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
