"""Tests of dataloader.py: readers, download, filtering, split, tasks, pretraining data."""
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from config import DataConfig, TaskConfig
import dataloader
from dataloader import DataError, load_data
from meta_learning import tasks
from meta_learning.tasks import PretrainDataset, TaskSampler
from ratings import download
from fixtures import (FORMAT_MODES, FORMATS, Payload, file_name, loopback_server,
                      make_ratings_frame, movielens_zip, write_ratings)
from options import parse_args

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HALF_STAR_FORMATS = ("ml-10m", "ml-latest-csv")
STRING_ID_FORMATS = tuple(f for f in FORMATS if f.startswith(("amazon", "yelp", "recbole")))


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


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    path = write_ratings(tmp_path_factory.mktemp("ml") / "ratings.dat", "ml-1m",
                         make_ratings_frame(num_users=60, num_items=80, seed=0))
    args = make_args(path)
    return load_data(DataConfig.from_args(args)), args


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
# Split and statistics
# --------------------------------------------------------------------------------------
def test_split_is_disjoint_complete_and_reproducible(ml_data):
    data, args = ml_data
    train, valid, test = data.train_users, data.valid_users, data.test_users
    assert len(test) == args.num_test_data
    assert len(train) == round(0.85 * (data.num_users - len(test)))
    assert not set(train) & set(valid) and not set(train) & set(test) and not set(valid) & set(test)
    assert sorted([*train, *valid, *test]) == list(range(data.num_users))
    again = load_data(DataConfig.from_args(args))
    for first, second in ((train, again.train_users), (valid, again.valid_users),
                          (test, again.test_users)):
        np.testing.assert_array_equal(first, second)


def test_split_follows_the_seed(ml_data):
    data, args = ml_data
    other = load_data(DataConfig.from_args(make_args(args.data_path, "ml-1m", "--random_seed=7")))
    assert data.test_users.tolist() != other.test_users.tolist()


def test_statistics(tmp_path, capsys):
    frame = sequence_frame([4, 40, 10, 5, 5, 5, 5, 5])
    data = load_data(DataConfig.from_args(make_args(write_ratings(tmp_path / "r.dat", "ml-1m", frame), "ml-1m",
                               "--min_sequence=4", "--num_test_data=1", "--val_size=1")))
    stats = data.stats
    assert (stats["num_users"], stats["num_items"], stats["num_ratings"]) == (8, 40, 79)
    assert stats["avg_seq_len"] == pytest.approx((4 + 30 + 10 + 25) / 8)   # truncated at L=30
    assert stats["avg_full_seq_len"] == pytest.approx(79 / 8)
    assert stats["rating_counts"] == frame.rating.value_counts().sort_index().to_dict()
    ratings = frame.rating.to_numpy()
    assert stats["balance_score"] == pytest.approx(dataloader.balance_score(ratings))
    train_ratings = np.concatenate([data.rating_seqs[u] for u in data.train_users])
    assert data.train_mean_rating == pytest.approx(train_ratings.mean())
    assert "balance score" in capsys.readouterr().out


def test_balance_score():
    assert dataloader.balance_score(np.repeat([1.0, 2, 3, 4, 5], 7)) == pytest.approx(1.0)
    assert dataloader.balance_score(np.full(9, 5.0)) == pytest.approx(0.0)
    ml100k = np.repeat([1.0, 2, 3, 4, 5], [61, 114, 271, 342, 212])
    assert dataloader.balance_score(ml100k) == pytest.approx(0.912, abs=1e-3)
    assert dataloader.balance_score(np.array([0.5, 5.0])) == pytest.approx(np.log(2) / np.log(10))


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------
def row_span(data, user, items, ratings, default_rating):
    """(start, length) of a padded row in the user's sequence; checks padding and values."""
    real = items != 0
    length = int(real.sum())
    assert real[len(real) - length:].all(), "padding must be on the left"
    assert (ratings[~real] == default_rating).all()
    if length == 0:
        return None
    position = {item: k for k, item in enumerate(data.item_seqs[user])}   # distinct items
    start = position[items[-length]]
    np.testing.assert_array_equal(items[-length:], data.item_seqs[user][start:start + length])
    np.testing.assert_array_equal(ratings[-length:], data.rating_seqs[user][start:start + length])
    return start, length


def check_task(batch, t, data, args, last_window, full_window=True):
    """The task invariants (README "Tasks") of task t; returns (target position, support spans)."""
    user = int(batch.users[t])
    n = len(data.item_seqs[user])
    rows = lambda items, ratings: [row_span(data, user, items[r].numpy(), ratings[r].numpy(),
                                            args.default_rating) for r in range(items.shape[0])]
    queries = rows(batch.query_items[t], batch.query_ratings[t])
    supports = rows(batch.support_items[t], batch.support_ratings[t])
    real_queries = [q for q in queries if q]
    real_supports = [s for s in supports if s]
    assert queries[:len(real_queries)] == real_queries and supports[:len(real_supports)] == real_supports

    targets = {start + length - 1 for start, length in real_queries}
    assert len(targets) == 1, "every query ends with the window's last interaction"
    target = targets.pop()
    if last_window:
        assert target == n - 1
    lengths = [length for _, length in real_queries]   # drawn with replacement
    assert min(lengths) >= args.min_sub_window_size
    assert len(set(real_supports)) == len(real_supports), "support sequences are distinct"
    for start, length in real_supports:
        assert start + length - 1 < target, "no support sequence contains the target"
        assert length >= args.min_sub_window_size
        assert start > target - args.max_seq_len
    if full_window:
        window = min(n, args.max_seq_len)
        assert max(lengths) <= window
        assert all(start > target - window for start, _ in real_supports)
        assert len(real_queries) == min(args.num_query_set, window - 2)
        assert len(real_supports) == min(args.num_samples,
                                         tasks.count_subwindows(window - 1, args.min_sub_window_size))
    return target, real_supports


def test_train_tasks_follow_the_design(ml_data):
    data, args = ml_data
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    for _ in range(4):
        batch = sampler.train_batch(16)
        assert batch.support_items.shape == (16, args.num_samples, args.max_seq_len)
        assert batch.query_items.shape == (16, args.num_query_set, args.max_seq_len)
        assert batch.support_items.dtype == torch.int64 and batch.support_ratings.dtype == torch.float32
        assert set(batch.users.tolist()) <= set(data.train_users.tolist())
        for t in range(16):
            check_task(batch, t, data, args, last_window=False)


def test_fixed_tasks_follow_the_design_with_default_rating(ml_data):
    data, _ = ml_data
    args = make_args(ml_data[1].data_path, "ml-1m", "--default_rating=1", "--num_samples=40",
                     "--num_query_set=5", "--min_sub_window_size=3", "--max_seq_len=10")
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    test = sampler.fixed_tasks("test")
    assert test.users.tolist() == data.test_users.tolist()
    assert any(len(data.item_seqs[u]) > 10 for u in data.test_users), "windows must be cut"
    for t in range(len(test)):
        check_task(test, t, data, args, last_window=True)
    valid = sampler.fixed_tasks("valid")
    assert len(valid) == args.val_size and set(valid.users.tolist()) <= set(data.valid_users.tolist())
    for t in range(len(valid)):
        check_task(valid, t, data, args, last_window=True)
    assert (test.support_mask == (test.support_items != 0).float()).all()
    assert (test.support_ratings[test.support_mask == 0] == 1).all()


def test_counts_follow_num_samples_and_num_query_set(tmp_path):
    frame = sequence_frame([4, 5, 6, 7, 12, 30, 40] * 3)
    path = write_ratings(tmp_path / "r.dat", "ml-1m", frame)
    args = make_args(path, "ml-1m", "--min_sequence=4", "--num_samples=8", "--num_query_set=3",
                     "--num_test_data=3", "--val_size=1")
    data = load_data(DataConfig.from_args(args))
    batch = TaskSampler(data, TaskConfig.from_args(args)).train_batch(len(data.train_users))
    for t in range(len(batch)):
        n = min(len(data.item_seqs[int(batch.users[t])]), args.max_seq_len)
        assert batch.query_row_mask[t].sum() == min(3, n - 2)
        assert (batch.support_items[t, :, -1] > 0).sum() == min(8, (n - 2) * (n - 1) // 2)
        check_task(batch, t, data, args, last_window=False)


def test_random_sequence_length_windows(ml_data):
    """The reference's cut: a window of min(n, L), then a random length in [min_sequence,
    min(n, L)] at a random offset inside it; every task still follows the design."""
    data, _ = ml_data
    args = make_args(ml_data[1].data_path, "ml-1m", "--use_random_sequence_length=True",
                     "--max_seq_len=12")
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    for _ in range(10):
        batch = sampler.train_batch(16)
        for t in range(16):
            check_task(batch, t, data, args, last_window=False, full_window=False)
    users = np.repeat(data.train_users, 50)
    starts, lengths = sampler._windows(users, np.random.default_rng(0), last_window=False)
    full = np.minimum(sampler.sequences.lengths[users], 12)
    assert (lengths >= args.min_sequence).all() and (lengths <= full).all()
    assert set(lengths.tolist()) == set(range(args.min_sequence, 13)), "every length is drawn"
    offsets = starts - sampler.sequences.offsets[users]
    assert (offsets >= 0).all() and (offsets + lengths <= sampler.sequences.lengths[users]).all()


def test_subwindow_numbering_covers_each_window_once():
    for span in range(1, 12):
        for min_length in range(1, span + 1):
            count = tasks.count_subwindows(span, min_length)
            offsets, lengths = tasks.subwindow_at(np.arange(count), span)
            windows = set(zip(offsets.tolist(), lengths.tolist()))
            assert windows == {(o, n) for n in range(min_length, span + 1)
                               for o in range(span - n + 1)}


def test_support_and_query_sampling_is_uniform(tmp_path):
    path = write_ratings(tmp_path / "r.dat", "ml-1m", sequence_frame([8] * 30))
    args = make_args(path, "ml-1m", "--max_seq_len=8", "--num_samples=5", "--num_query_set=3")
    sampler = TaskSampler(load_data(DataConfig.from_args(args)), TaskConfig.from_args(args))
    batches = [sampler.train_batch(16) for _ in range(600)]
    support_lengths = torch.cat([(b.support_items != 0).sum(-1) for b in batches]).flatten()
    support_starts = torch.cat([b.support_items[..., -1] - 1 for b in batches]).flatten() \
        - support_lengths + 1                    # items are 1..8 in order, so item - 1 = position
    windows = pd.Series(list(zip(support_starts.tolist(), support_lengths.tolist()))).value_counts()
    assert len(windows) == 21                    # all sub-windows of length >= 2 in 7 positions
    expected = len(support_lengths) / 21
    assert windows.min() > 0.9 * expected and windows.max() < 1.1 * expected
    # query lengths as the reference draws them: uniform on [min_sub_window_size, |W|] = [2, 8],
    # with replacement (3 draws from 7 lengths repeat one in 39 % of the tasks)
    query_lengths = torch.cat([(b.query_items != 0).sum(-1) for b in batches])  # [tasks, 3]
    lengths = pd.Series(query_lengths.flatten().tolist()).value_counts()
    assert sorted(lengths.index) == [2, 3, 4, 5, 6, 7, 8]
    assert lengths.min() > 0.9 * query_lengths.numel() / 7 and lengths.max() < 1.1 * query_lengths.numel() / 7
    repeats = (query_lengths.sort(-1).values.diff(dim=-1) == 0).any(-1).float().mean()
    assert 0.35 < repeats < 0.43


def test_train_epochs_visit_every_user_once(ml_data):
    data, args = ml_data
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    users = torch.cat([sampler.train_batch(7).users for _ in range(len(data.train_users) // 7 + 1)])
    epoch = users[:len(data.train_users)].tolist()
    assert sorted(epoch) == data.train_users.tolist()


def test_state_dict_resumes_the_train_stream(ml_data):
    data, args = ml_data
    first = TaskSampler(data, TaskConfig.from_args(args))
    for _ in range(9):                            # past the end of the first epoch
        first.train_batch(7)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [first.train_batch(7) for _ in range(6)]
    resumed = TaskSampler(data, TaskConfig.from_args(args))
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.train_batch(7) for _ in range(6))):
        assert torch.equal(want.users, got.users)
        assert torch.equal(want.support_items, got.support_items)
        assert torch.equal(want.query_ratings, got.query_ratings)


def test_fixed_tasks_are_the_same_for_every_sampler(ml_data):
    data, args = ml_data
    first, second = TaskSampler(data, TaskConfig.from_args(args)), TaskSampler(data, TaskConfig.from_args(args))
    second.train_batch(16)                        # the train stream does not matter
    for split in ("valid", "test"):
        a, b = first.fixed_tasks(split), second.fixed_tasks(split)
        for name in ("users", "support_items", "support_ratings", "query_items", "query_ratings"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    other_seed = TaskSampler(data, TaskConfig.from_args(make_args(args.data_path, "ml-1m", "--random_seed=5")))
    assert not torch.equal(first.fixed_tasks("test").support_items,
                           other_seed.fixed_tasks("test").support_items)


def test_task_batch_helpers(ml_data):
    data, args = ml_data
    batch = TaskSampler(data, TaskConfig.from_args(args)).train_batch(6)
    part = batch[2:5]
    assert len(part) == 3 and torch.equal(part.query_items, batch.query_items[2:5])
    assert batch[-1].support_items.shape == (1, args.num_samples, args.max_seq_len)
    assert torch.equal(batch[-1].users, batch.users[5:])
    assert torch.equal(batch.target_ratings, batch.query_ratings[:, :, -1])
    assert batch.query_mask.dtype == torch.float32
    assert torch.equal(batch.query_row_mask, (batch.query_items[:, :, -1] != 0).float())
    moved = batch.to("cpu")
    assert torch.equal(moved.support_ratings, batch.support_ratings)


# --------------------------------------------------------------------------------------
# Pretraining data
# --------------------------------------------------------------------------------------
def test_pretrain_dataset(ml_data):
    data, args = ml_data
    dataset = PretrainDataset(data, data.train_users, TaskConfig.from_args(args), seed=4)
    assert len(dataset) == len(data.train_users)
    shorter_than_window = 0
    for index in range(len(dataset)):
        items, ratings = dataset[index]
        assert items.shape == ratings.shape == (args.max_seq_len,)
        user = int(data.train_users[index])
        _, length = row_span(data, user, items.numpy(), ratings.numpy(), args.default_rating)
        window = min(len(data.item_seqs[user]), args.max_seq_len)
        assert args.min_sub_window_size <= length <= window
        shorter_than_window += length < window
    assert shorter_than_window > len(dataset) // 2, "sub-windows of random length"
    draw = lambda seed: torch.stack([PretrainDataset(data, data.train_users, TaskConfig.from_args(args), seed)[i][0]
                                     for i in range(len(data.train_users))])
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    items, ratings = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)))
    assert items.shape == ratings.shape == (8, args.max_seq_len)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_missing_file_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv.*Data/README\.md"):
        load_data(DataConfig.from_args(make_args(tmp_path / "nope.csv", "amazon")))
    with pytest.raises(DataError, match="downloaded automatically"):   # outside Data/: no download
        load_data(DataConfig.from_args(make_args(tmp_path / "ratings.dat", "ml-1m")))


def test_misnamed_columns_say_expected_and_found(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("score,reviewer,product_id,date\n5,a,b,1\n")
    with pytest.raises(DataError, match=r"'score', 'reviewer'.*reviewerID, product_id, rating, date"):
        load_data(DataConfig.from_args(make_args(path, "amazon")))
    path.write_text('{"user": "a", "item": "b"}\n')
    with pytest.raises(DataError, match="JSON fields"):
        load_data(DataConfig.from_args(make_args(path, "amazon")))


def test_malformed_files_give_a_data_error(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('rating,reviewerID,product_id,date\n5,"abc,def,1\n4,x,y,2\n')
    with pytest.raises(DataError, match="cannot parse it as amazon-csv"):
        load_data(DataConfig.from_args(make_args(path, "amazon")))
    path.write_bytes(b"1::2::3::4\n\xff\xfe::1::3::4\n")
    with pytest.raises(DataError, match="cannot read .* as text"):
        load_data(DataConfig.from_args(make_args(path)))


def test_bad_ratings_are_dropped_and_counted(tmp_path, capsys):
    frame = make_ratings_frame(num_users=40, num_items=50, seed=5, string_ids=True)
    path = write_ratings(tmp_path / "r.csv", "amazon", frame)
    lines = path.read_text().splitlines()
    for row, rating in ((1, "abc"), (2, "7"), (3, "3.3"), (4, "0")):
        lines[row] = rating + lines[row][lines[row].index(","):]
    lines[5] = "4,," + lines[5].split(",", 3)[3]           # no user, no item
    path.write_text("\n".join(lines) + "\n")
    data = load_data(DataConfig.from_args(make_args(path, "amazon")))
    out = capsys.readouterr().out
    assert f"dropped 5 of {len(frame):,} rows" in out
    assert "1 with a non-numeric rating" in out and "3 with a rating outside 0.5..5" in out
    assert "1 with a missing user or item id" in out
    expected = expected_sequences(frame.drop(index=[0, 1, 2, 3, 4]), 1, 5, kind="quicksort")
    assert loaded_sequences(data) == expected


def test_infinite_and_overflowing_dates_are_dropped_and_counted(tmp_path, capsys):
    frame = make_ratings_frame(num_users=40, num_items=50, seed=5)
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", frame)
    lines = path.read_text().splitlines()
    for row, date in ((0, "inf"), (1, "-inf"), (2, "1e30")):   # once cast to INT64_MIN: moved to the front
        lines[row] = lines[row].rsplit("::", 1)[0] + "::" + date
    path.write_text("\n".join(lines) + "\n")
    data = load_data(DataConfig.from_args(make_args(path)))
    out = capsys.readouterr().out
    assert f"dropped 3 of {len(frame):,} rows" in out and "3 with a date that is infinite or beyond ±5e+18" in out
    without = write_ratings(tmp_path / "without" / "ratings.dat", "ml-1m", frame.drop(index=[0, 1, 2]))
    assert loaded_sequences(data) == loaded_sequences(load_data(DataConfig.from_args(make_args(without))))


def test_a_file_on_another_rating_scale_is_refused_naming_the_scale(tmp_path):
    frame = make_ratings_frame(num_users=40, num_items=50, seed=5)
    frame["rating"] = (frame["rating"] * 2).astype(int)            # 2..10: most off the 0.5..5 scale
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", frame)
    with pytest.raises(DataError, match=r"ratings are outside 0.5..5 \(its ratings go from 2 to 10\): another "
                                        r"rating scale; map it onto 1..5 stars first"):
        load_data(DataConfig.from_args(make_args(path)))


def test_broken_json_lines_are_dropped_and_counted(tmp_path, capsys):
    frame = make_ratings_frame(num_users=30, num_items=40, seed=11, string_ids=True)
    path = write_ratings(tmp_path / "review.json", "yelp-review-json", frame)
    path.write_text(path.read_text() + '{"user_id": "cut off\n')
    data = load_data(DataConfig.from_args(make_args(path, "yelp")))
    assert f"dropped 1 of {len(frame) + 1:,} rows" in capsys.readouterr().out
    assert loaded_sequences(data) == expected_sequences(frame, 1, 5, kind="quicksort")


def test_no_usable_rating_is_an_error(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("rating,reviewerID,product_id,date\nfive,a,b,1\n9,a,c,2\n")
    with pytest.raises(DataError, match="none of its 2 rows is usable"):
        load_data(DataConfig.from_args(make_args(path, "amazon")))


def test_nothing_left_after_filtering_names_the_threshold(ml_data):
    path = ml_data[1].data_path
    with pytest.raises(DataError, match="lower --min_item"):
        load_data(DataConfig.from_args(make_args(path, "ml-1m", "--min_item=10000")))
    with pytest.raises(DataError, match="lower --min_sequence"):
        load_data(DataConfig.from_args(make_args(path, "ml-1m", "--min_sequence=1000")))


def test_split_sizes_larger_than_the_users(ml_data):
    data, args = ml_data
    with pytest.raises(DataError, match=f"{data.num_users} users after filtering"):
        load_data(DataConfig.from_args(make_args(args.data_path, "ml-1m", "--num_test_data=1000")))
    with pytest.raises(DataError, match=f"{len(data.valid_users)} validation users"):
        load_data(DataConfig.from_args(make_args(args.data_path, "ml-1m", "--val_size=100")))


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
