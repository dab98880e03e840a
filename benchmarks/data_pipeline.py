"""Speed of the data pipeline: preprocessing a MovieLens-1M-sized file, and task sampling.

    python benchmarks/data_pipeline.py [--num_ratings=1000000] [--seconds=3]

Writes a generated ``ratings.dat`` (ML-1M layout: 6,040 users, 3,706 items, skewed item
popularity and ratings) to a temporary folder, times ``load_data`` on it at the default
filters, then times ``TaskSampler.train_batch`` at the default task settings (L=30, S=25,
Q=3, 16 tasks a batch) and building the fixed test tasks.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import DataConfig, TaskConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from meta_learning.tasks import PretrainDataset, TaskSampler  # noqa: E402
from options import parse_args  # noqa: E402

NUM_USERS, NUM_ITEMS = 6_040, 3_706                  # as ML-1M
STAR_PROBABILITIES = [0.056, 0.108, 0.261, 0.349, 0.226]


def write_movielens_file(path: Path, num_ratings: int, seed: int = 0) -> None:
    """``num_ratings`` lines user::item::rating::timestamp with skewed users, items and stars."""
    rng = np.random.default_rng(seed)
    user_weights = rng.pareto(1.5, NUM_USERS) + 0.05
    item_weights = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 0.9
    users = rng.choice(NUM_USERS, num_ratings, p=user_weights / user_weights.sum()) + 1
    items = rng.choice(NUM_ITEMS, num_ratings, p=item_weights / item_weights.sum()) + 1
    stars = rng.choice(np.arange(1, 6), num_ratings, p=STAR_PROBABILITIES)
    times = rng.integers(956_703_932, 1_046_454_590, num_ratings)
    with open(path, "w") as out:
        out.writelines(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in zip(users, items, stars, times))


def time_train_sampling(sampler: TaskSampler, batch_size: int, seconds: float) -> float:
    """Train tasks per second over about ``seconds``."""
    sampler.train_batch(batch_size)                   # warm-up
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.train_batch(batch_size)
        batches += 1
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_ratings", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each timing")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ratings.dat"
        start = time.perf_counter()
        write_movielens_file(path, options.num_ratings)
        print(f"generated {options.num_ratings:,} ratings in {time.perf_counter() - start:.1f} s")
        args = parse_args(["--data_path", str(path), "--mode=ml-1m"])
        start = time.perf_counter()
        data = load_data(DataConfig.from_args(args))
        print(f"preprocessing (load_data): {time.perf_counter() - start:.2f} s")

    sampler = TaskSampler(data, TaskConfig.from_args(args))
    rate = time_train_sampling(sampler, args.batch_size, options.seconds)
    print(f"train task sampling: {rate:,.0f} tasks/s (batches of {args.batch_size}, "
          f"L={args.max_seq_len}, S={args.num_samples}, Q={args.num_query_set}; target >= 5,000)")

    start = time.perf_counter()
    test = sampler.fixed_tasks("test")
    print(f"fixed test tasks: {len(test):,} tasks in {time.perf_counter() - start:.3f} s")

    dataset = PretrainDataset(data, data.train_users, TaskConfig.from_args(args), seed=0)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    print(f"pretraining sequences: {len(dataset) / (time.perf_counter() - start):,.0f} per s")


if __name__ == "__main__":
    main()
