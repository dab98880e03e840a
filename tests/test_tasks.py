"""meta_learning/tasks.py: users to tasks (the design of the windows, support and query sets, their
draws and resumption) and Basic's training sequences."""
import io

import numpy as np
import pandas as pd
import torch

from config import DataConfig, TaskConfig
from dataloader import load_data
from fixtures import make_args, sequence_frame, write_ratings
from meta_learning import tasks
from meta_learning.tasks import PretrainDataset, TaskSampler


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
