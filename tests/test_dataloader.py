"""dataloader.py: the user split, the statistics, and what bad input gives."""
import numpy as np
import pytest

from config import DataConfig
from dataloader import DataError, load_data
import dataloader
from fixtures import expected_sequences, loaded_sequences, make_args, make_ratings_frame, sequence_frame, write_ratings


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


def test_the_data_digest_names_the_sequences_and_their_order_of_same_date_ratings(tmp_path):
    frame = make_ratings_frame(num_users=30, num_items=40, seed=5)
    ties = frame[frame.duplicated(["user", "timestamp"], keep=False)].groupby(["user", "timestamp"])
    first, second = next(iter(ties.groups.values()))[:2]           # one user's two ratings of one date
    assert frame.loc[first, "item"] != frame.loc[second, "item"]
    swapped = frame.copy()
    swapped.loc[[first, second]] = frame.loc[[second, first]].to_numpy()

    def digest(frame, name):
        path = write_ratings(tmp_path / name / "ratings.dat", "ml-1m", frame)
        return load_data(DataConfig.from_args(make_args(path, "ml-1m", "--stable_date_sort=True"))).digest

    original = digest(frame, "a")
    assert len(original) == 16 and int(original, 16) >= 0
    assert digest(frame, "b") == original                            # the same file: the same digest
    assert digest(swapped, "c") != original                          # the same ratings in another order
    items, ratings, lengths = np.array([3, 1, 2]), np.array([4.0, 5.0, 3.0]), np.array([2, 1])
    assert dataloader.sequences_digest(items, ratings, lengths) != dataloader.sequences_digest(
        items[[1, 0, 2]], ratings[[1, 0, 2]], lengths)
