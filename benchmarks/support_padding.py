"""How much of a task batch's support work is padding: what whole rows (--compile), support
chunks (the eager CPU default) and chunks of a few static lengths would run.

    python benchmarks/support_padding.py --data_path=../shared/data/ml-100k/ratings.dat [--batches=200]

Draws training batches (seeded by --random_seed) at the default task settings (16 tasks of 25 support sequences of at
most 30 interactions) and prints, as fractions of the whole rows' positions: the real
positions; what K support chunks run (``support_item_chunks``: each group of rows cut to its
longest row in any task), for K = 1 … 5; and the lengths that 3 chunks would have if each
were rounded up to a multiple of ``--bucket`` — each combination a graph of its own to
compile — with how often each combination comes.
"""
import argparse
import collections
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import DataConfig, TaskConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from meta_learning.inner_loop_execution import support_item_chunks  # noqa: E402
from meta_learning.tasks import TaskSampler  # noqa: E402
from options import parse_args  # noqa: E402


def sorted_rows(batch):
    """Each task's support rows longest first, as the meta-learner orders them: items [T, S, L]."""
    order = batch.support_mask.sum(-1).argsort(dim=1, descending=True, stable=True)
    return batch.support_items.gather(1, order.unsqueeze(-1).expand_as(batch.support_items))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="a rating file in the ml-1m layout")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--bucket", type=int, default=10, help="round chunk lengths up to multiples of this")
    options, flags = parser.parse_known_args()
    args = parse_args([f"--data_path={options.data_path}", "--num_test_data=150", "--val_size=100", *flags])
    sampler = TaskSampler(load_data(DataConfig.from_args(args)), TaskConfig.from_args(args))
    real, chunked, static_lengths = 0.0, collections.Counter(), collections.Counter()
    for _ in range(options.batches):
        items = sorted_rows(sampler.train_batch(args.batch_size))   # [T, S, L]
        whole = items[..., 0].numel() * items.shape[-1] / items.shape[0]   # positions of one task's rows
        real += (items > 0).float().sum().item() / items.shape[0] / whole
        for chunks in range(1, 6):
            chunked[chunks] += sum(chunk[0].numel() for chunk in support_item_chunks(items, chunks)) / whole
        static_lengths[tuple(min(items.shape[-1], options.bucket * math.ceil(chunk.shape[-1] / options.bucket))
                             for chunk in support_item_chunks(items, 3))] += 1
    print(f"{options.batches} batches of {args.batch_size} tasks, {args.num_samples} support rows of "
          f"{args.max_seq_len} positions (fractions of the whole rows' positions)")
    print(f"real positions: {real / options.batches:.3f}")
    for chunks, total in chunked.items():
        print(f"{chunks} support chunk(s): {total / options.batches:.3f}")
    print(f"3 chunks, lengths rounded up to multiples of {options.bucket} (a graph each): " +
          ", ".join(f"{lengths} in {count / options.batches:.0%}" for lengths, count in static_lengths.most_common()))


if __name__ == "__main__":
    main()
