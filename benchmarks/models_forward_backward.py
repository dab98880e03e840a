"""Forward + backward time of every recommender at the default sizes.

    python benchmarks/models_forward_backward.py [--models bert4rec gru4rec] [--repeats 5]

Per model, median seconds of:
  plain     model(items [T*S, L]) and backward (train mode)
  vmap      vmap(functional_call) over items [T, S, L], shared parameters, and backward
  2nd-order one inner step per task under vmap (torch.func.grad, LSLR update), then the
            query loss [T, Q, L] and its backward to the initial parameters and the rates
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import ModelConfig  # noqa: E402
from inner_loop_optimizers import LSLRGradientDescentLearningRule  # noqa: E402
from models import model_factory  # noqa: E402
from options import MODELS, parse_args  # noqa: E402

NUM_ITEMS = 3000


def left_padded(shape, num_items, max_len, generator):
    """Random item sequences of random length (2..L), left-padded with 0."""
    items = torch.randint(1, num_items + 1, shape, generator=generator)
    lengths = torch.randint(2, max_len + 1, shape[:-1], generator=generator)
    return torch.where(torch.arange(max_len) >= max_len - lengths.unsqueeze(-1), items, 0)


def masked_mse(predictions, items, ratings):
    real = (items > 0).float()
    return (((predictions - ratings / 5) ** 2) * real).sum() / real.sum()


def median_time(fn, repeats):
    fn(), fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(name, tasks, supports, queries, repeats):
    args = parse_args([f"--model={name}"])
    model = model_factory(ModelConfig.from_args(args, NUM_ITEMS)).train()
    L, g = args.max_seq_len, torch.Generator().manual_seed(0)
    support = left_padded((tasks, supports, L), NUM_ITEMS, L, g)
    query = left_padded((tasks, queries, L), NUM_ITEMS, L, g)
    support_ratings = torch.randint(1, 6, support.shape, generator=g).float()
    query_ratings = torch.randint(1, 6, query.shape, generator=g).float()
    params = dict(model.named_parameters())
    rule = LSLRGradientDescentLearningRule(params, args.num_inner_steps, args.inner_lr, True)

    def plain():
        flat = support.reshape(-1, L)
        masked_mse(model(flat), flat, support_ratings.reshape(-1, L)).backward()

    def vmapped():
        predict = vmap(lambda items: functional_call(model, params, (items,)), randomness="different")
        masked_mse(predict(support), support, support_ratings).backward()

    def task_query_loss(items, ratings, q_items, q_ratings):
        def support_loss(p):
            return masked_mse(functional_call(model, p, (items,)), items, ratings)
        adapted = rule.update_params(params, grad(support_loss)(params), step=0)
        return masked_mse(functional_call(model, adapted, (q_items,)), q_items, q_ratings)

    def second_order():
        losses = vmap(task_query_loss, randomness="different")(support, support_ratings, query, query_ratings)
        losses.mean().backward()

    results = [median_time(fn, repeats) for fn in (plain, vmapped, second_order)]
    size = sum(p.numel() for p in model.parameters())
    print(f"{name:9s} {size:9d} " + " ".join(f"{t:10.4f}" for t in results), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--supports", type=int, default=25)
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cli.tasks} tasks x {cli.supports} "
          f"support / {cli.queries} query sequences of length 30, 3000 items; median of {cli.repeats}, seconds")
    print(f"{'model':9s} {'params':>9s} {'plain':>10s} {'vmap':>10s} {'2nd-order':>10s}")
    for name in cli.models:
        benchmark(name, cli.tasks, cli.supports, cli.queries, cli.repeats)


if __name__ == "__main__":
    main()
