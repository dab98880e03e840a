"""Rating files: every layout read alike, MovieLens downloaded on demand (loopback server), and
the real public files (ratings/, dataloader.py)."""
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from config import DataConfig, TaskConfig
from dataloader import DataError, load_data
from fixtures import (FORMAT_MODES, FORMATS, Payload, expected_sequences, file_name, loaded_sequences, loopback_server,
                      make_args, make_ratings_frame, movielens_zip, sequence_frame, write_ratings)
from meta_learning.tasks import TaskSampler
from options import parse_args
from ratings import download

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HALF_STAR_FORMATS = ("ml-10m", "ml-latest-csv")
STRING_ID_FORMATS = tuple(f for f in FORMATS if f.startswith(("amazon", "yelp", "recbole")))


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_format(tmp_path, fmt):
    frame = make_ratings_frame(num_users=40, num_items=150, seed=3,
                               half_stars=fmt in HALF_STAR_FORMATS,
                               string_ids=fmt in STRING_ID_FORMATS)
    path = write_ratings(tmp_path / file_name(fmt), fmt, frame)
    data = load_data(DataConfig.from_args(make_args(path, FORMAT_MODES[fmt], "--min_item=3", "--stable_date_sort=True")))

    expected = expected_sequences(frame, min_item=3, min_sequence=5)
    assert sum(len(items) for items, _ in expected.values()) < len(frame), "rare items dropped"
    assert loaded_sequences(data) == expected
    assert data.num_users == len(expected)
    assert data.num_items == len({i for items, _ in expected.values() for i in items})
    assert data.stats["num_ratings"] == sum(len(items) for items, _ in expected.values())
    assert data.rating_values.tolist() == sorted({r for _, rs in expected.values() for r in rs})


def test_default_date_sort_orders_ties_as_the_reference(tmp_path):
    """The reference sorts the filtered rows with pandas' sort_values("date") (quicksort):
    same-second ratings come out in that order, not in file order, by default."""
    frame = make_ratings_frame(num_users=40, num_items=150, seed=3)
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", frame)
    reference_order = expected_sequences(frame, min_item=3, min_sequence=5, kind="quicksort")
    file_order = expected_sequences(frame, min_item=3, min_sequence=5, kind="stable")
    assert reference_order != file_order, "the fixture must have ties that the two sorts order differently"
    assert loaded_sequences(load_data(DataConfig.from_args(make_args(path, "ml-1m", "--min_item=3")))) == reference_order


def test_string_ids_keep_leading_zeros_and_are_sorted(tmp_path):
    frame = make_ratings_frame(num_users=30, num_items=40, seed=1, string_ids=True)
    data = load_data(DataConfig.from_args(make_args(write_ratings(tmp_path / "r.csv", "amazon", frame), "amazon")))
    assert data.item_ids.dtype.kind == "U"
    assert all(len(i) == 10 and i.isdigit() for i in data.item_ids)      # '0000000042', not 42
    assert data.item_ids.tolist() == sorted(frame.item.unique())
    assert data.user_ids.tolist() == sorted(frame.user.unique())


def test_numeric_ids_sort_as_numbers(ml_data):
    data, _ = ml_data
    assert data.user_ids.dtype == np.int64
    assert data.user_ids.tolist() == sorted(data.user_ids.tolist())
    assert data.user_ids[:3].tolist() == [1, 2, 3]


def test_item_filter_comes_before_user_filter(tmp_path):
    frame = sequence_frame([5, 6, 5, 5, 5, 5, 5, 5])
    frame.loc[frame.user == 1, "item"] = [1, 2, 3, 4, 99]     # items 98, 99: one rating each
    frame.loc[frame.user == 2, "item"] = [1, 2, 3, 4, 5, 98]
    data = load_data(DataConfig.from_args(make_args(write_ratings(tmp_path / "r.dat", "ml-1m", frame), "ml-1m",
                               "--min_item=2", "--num_test_data=1", "--val_size=1")))
    assert data.user_ids.tolist() == [2, 3, 4, 5, 6, 7, 8]    # user 1 is left with 4 ratings
    assert data.item_ids.tolist() == [1, 2, 3, 4, 5]
    assert data.item_ids[data.item_seqs[0] - 1].tolist() == [1, 2, 3, 4, 5]


def test_ids_identical_across_hash_seeds(tmp_path):
    path = write_ratings(tmp_path / "r.csv", "amazon",
                         make_ratings_frame(num_users=50, num_items=60, seed=2, string_ids=True))
    script = (
        "import json\nfrom options import parse_args\nimport dataloader\n"
        f"data = dataloader.load_data(parse_args(['--mode=amazon', '--data_path={path}', "
        "'--min_item=1', '--num_test_data=5', '--val_size=3']))\n"
        "print('RESULT', json.dumps([data.user_ids.tolist(), data.item_ids.tolist(), "
        "[s.tolist() for s in data.item_seqs], data.test_users.tolist()]))\n")
    results = []
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                              check=True)
        results.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
    assert results[0] == results[1]
    assert results[0][1] == sorted(results[0][1])


# --------------------------------------------------------------------------------------
# MovieLens download (loopback server)
# --------------------------------------------------------------------------------------
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def download_args(mode, url):
    return make_args(f"./Data/{mode}/ratings.dat", mode, f"--download_url={url}")


@pytest.mark.parametrize("mode, folder", [("ml-1m", "ml-1m"), ("ml-10m", "ml-10M100K")])
def test_download_unpacks_into_data(workdir, mode, folder):
    frame = make_ratings_frame(num_users=30, seed=6, half_stars=mode == "ml-10m")
    (workdir / "Data" / mode).mkdir(parents=True)
    (workdir / "Data" / mode / "movies.dat").write_text("left over\n")  # lacks ratings.dat
    with loopback_server({"/m.zip": movielens_zip(frame, folder)}) as base:
        data = load_data(DataConfig.from_args(download_args(mode, f"{base}/m.zip")))
    assert loaded_sequences(data) == expected_sequences(frame, 1, 5, kind="quicksort")
    assert sorted(os.listdir(workdir / "Data")) == [mode]             # no temporary leftovers
    assert sorted(os.listdir(workdir / "Data" / mode)) == ["README", "movies.dat", "ratings.dat"]
    with loopback_server({}) as base:                                  # present now: no download
        assert load_data(DataConfig.from_args(download_args(mode, f"{base}/m.zip"))).num_users == data.num_users


def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/ml-1m.zip"


def truncated_zip():
    archive = movielens_zip(make_ratings_frame(num_users=30, seed=7))
    return archive[:len(archive) // 2]


@pytest.mark.parametrize("routes, path, message", [
    ({}, "/ml-1m.zip", "HTTP 404"),
    ({"/ml-1m.zip": truncated_zip()}, "/ml-1m.zip", "not a valid zip"),
    ({"/ml-1m.zip": Payload(truncated_zip(), content_length=10**6)}, "/ml-1m.zip", "stopped after"),
    ({"/ml-1m.zip": b"<html>not a zip</html>"}, "/ml-1m.zip", "not a valid zip"),
])
def test_failed_download_leaves_nothing(workdir, routes, path, message):
    with loopback_server(routes) as base, pytest.raises(DataError, match=message) as error:
        load_data(DataConfig.from_args(download_args("ml-1m", base + path)))
    assert "Data/ml-1m/ratings.dat" in str(error.value)                # where to put it by hand
    assert os.listdir(workdir / "Data") == []


def test_interrupted_move_leaves_no_ratings_file(workdir, monkeypatch):
    moves = []

    def replace_then_interrupt(source, target):
        if moves:
            raise KeyboardInterrupt
        moves.append(target)
        os.rename(source, target)

    monkeypatch.setattr(download.os, "replace", replace_then_interrupt)
    archive = movielens_zip(make_ratings_frame(num_users=30, seed=10))
    with loopback_server({"/m.zip": archive}) as base, pytest.raises(KeyboardInterrupt):
        load_data(DataConfig.from_args(download_args("ml-1m", f"{base}/m.zip")))
    assert os.listdir(workdir / "Data") == ["ml-1m"]                   # temporary folder gone
    assert "ratings.dat" not in os.listdir(workdir / "Data" / "ml-1m")  # so it downloads again


def test_archive_without_ratings_is_refused(workdir):
    frame = make_ratings_frame(num_users=30, seed=8)
    archive = movielens_zip(frame).replace(b"ratings.dat", b"ratingz.dat")
    with loopback_server({"/m.zip": archive}) as base, pytest.raises(DataError, match="no ratings.dat"):
        load_data(DataConfig.from_args(download_args("ml-1m", f"{base}/m.zip")))
    assert os.listdir(workdir / "Data") == []


def test_no_network_says_where_to_put_the_files(workdir):
    with pytest.raises(DataError, match=r"no network.*by hand.*Data/ml-1m/ratings\.dat"):
        load_data(DataConfig.from_args(download_args("ml-1m", closed_port_url())))
    assert os.listdir(workdir / "Data") == []


def test_download_times_out(tmp_path):
    payload = Payload(movielens_zip(make_ratings_frame(num_users=30, seed=9)), delay_s=2.0)
    with loopback_server({"/m.zip": payload}) as base, pytest.raises(DataError, match="timed out"):
        download.download_movielens("ml-1m", tmp_path / "Data" / "ml-1m", f"{base}/m.zip", timeout=0.3)
    assert os.listdir(tmp_path / "Data") == []


# --------------------------------------------------------------------------------------
# Real public files (../shared/data, not in the repository)
# --------------------------------------------------------------------------------------
REAL_FILES = [  # path, mode, flags, (users, items, ratings) from SOURCES.md
    ("ml-100k/ratings.dat", "ml-1m", [], (943, 603, 83_715)),
    ("amazon-magazine/magazine_ratings.csv", "amazon", ["--min_item=5"], (401, 734, 2_712)),
    ("amazon-videogames-p4r/amazon_videogames_p4r_ratings.csv", "amazon", ["--min_item=5"],
     (769, 2_599, 28_634)),
    ("amazon-videogames-p4r/Amazon_Video_Games.inter", "amazon", ["--min_item=5"], (769, 2_599, 28_634)),
    ("ml-latest-small/ratings.csv", "ml-10m", [], (595, 450, 41_330)),
]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize("relative_path, mode, flags, expected", REAL_FILES)
def test_real_files(relative_path, mode, flags, expected, capsys):
    args = parse_args(["--data_path", str(SHARED_DATA / relative_path), f"--mode={mode}",
                       "--num_test_data=50", "--val_size=30", *flags])
    data = load_data(DataConfig.from_args(args))
    stats = data.stats
    assert (stats["num_users"], stats["num_items"], stats["num_ratings"]) == expected
    assert 0.5 < stats["balance_score"] < 1
    assert "balance score" in capsys.readouterr().out
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    assert sampler.train_batch(16).support_items.shape == (16, 25, 30)
    test = sampler.fixed_tasks("test")
    assert len(test) == 50 and test.query_row_mask.sum() == 150
    if "ml-latest" in relative_path:
        assert 0.5 in data.rating_values and 4.5 in data.rating_values


def test_bundled_latest_small_is_the_grouplens_file():
    """The quick start's file: GroupLens' ratings.csv (100,836 rows), gzipped, read as it is."""
    path = Path(__file__).resolve().parents[1] / "Data" / "ml-latest-small" / "ratings.csv.gz"
    with gzip.open(path, "rb") as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == \
            "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"
    data = load_data(DataConfig.from_args(parse_args(["--data_path", str(path), "--mode=ml-10m",
                                                      "--num_test_data=50", "--val_size=30"])))
    assert (data.stats["num_users"], data.stats["num_items"], data.stats["num_ratings"]) == (595, 450, 41_330)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not here")
def test_real_string_ids_keep_leading_zeros():
    path = SHARED_DATA / "amazon-videogames-p4r" / "amazon_videogames_p4r_ratings.csv"
    data = load_data(DataConfig.from_args(parse_args(["--data_path", str(path), "--mode=amazon", "--min_item=1",
                                 "--num_test_data=50", "--val_size=30"])))
    assert "0700026657" in data.item_ids
    assert data.item_ids.tolist() == sorted(data.item_ids.tolist())


def test_duplicate_rows_are_counted_kept_by_default_and_dropped_on_request(tmp_path, capsys):
    frame = make_ratings_frame(num_users=40, num_items=60, seed=1)
    doubled = pd.concat([frame, frame.iloc[:25]], ignore_index=True)
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", doubled)
    kept = load_data(DataConfig.from_args(make_args(path, "ml-1m", "--stable_date_sort=True")))
    assert "25 rows repeat an earlier row exactly" in capsys.readouterr().out
    assert kept.stats["duplicate_rows"] == 25
    assert kept.stats["num_ratings"] == len(doubled)
    dropped = load_data(DataConfig.from_args(make_args(path, "ml-1m", "--stable_date_sort=True", "--drop_duplicates=True")))
    assert "dropped (--drop_duplicates=True)" in capsys.readouterr().out
    assert dropped.stats["num_ratings"] == len(frame)
    assert loaded_sequences(dropped) == expected_sequences(frame, min_item=1, min_sequence=5)
