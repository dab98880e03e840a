"""Seconds per outer meta-training iteration and tasks per second, in 1 and in 2 processes
(torch.distributed, gloo on the CPU; one thread each), at task batches of 16 and 64.

    python benchmarks/processes_speed.py [--model bert4rec] [--method melo] [--batch_sizes 16 64]

Each process adapts its share of every batch (run/distributed.py); the iterations are timed on
rank 0 after one warm-up iteration.  Data: ``--data_path``, by default
``../shared/data/ml-100k`` (through the ml-1m reader).
"""
import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import DataConfig, MetaRunConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
import main  # noqa: E402
from options import parse_args  # noqa: E402
from run import distributed  # noqa: E402

SHARED_ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "ratings.dat"


def time_iterations(rank, world_size, port, flags, iterations, out):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    try:
        args = parse_args(flags)
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            data = load_data(DataConfig.from_args(args))
            sys.stdout = stdout
        trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
        seconds = []
        for _ in range(iterations + 1):   # the first is the warm-up
            batch = trainer.sampler.train_batch(args.batch_size)
            started = time.perf_counter()
            trainer.train_step(batch)
            seconds.append(time.perf_counter() - started)
        if distributed.is_main():
            Path(out).write_text(str(statistics.median(seconds[1:])))
    finally:
        distributed.stop()


def measure(world_size, flags, iterations):
    with tempfile.TemporaryDirectory() as workdir, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        out = Path(workdir) / "seconds"
        flags = [*flags, f"--log_dir={workdir}"]
        mp.spawn(time_iterations, args=(world_size, port, flags, iterations, str(out)), nprocs=world_size)
        return float(out.read_text())


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert4rec")
    parser.add_argument("--method", choices=("maml", "melo"), default="melo")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--world_sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--data_path", default=str(SHARED_ML100K))
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more main.py flags")
    options = parser.parse_args()
    if not Path(options.data_path).is_file():
        sys.exit(f"error: no rating file at {options.data_path}; give --data_path=RATINGS.dat (the ml-1m layout)")
    base = [f"--model={options.model}", f"--data_path={options.data_path}", "--num_test_data=150", "--val_size=100",
            f"--use_adaptive_loss={options.method == 'melo'}", *options.flags]
    print(f"{options.model} {options.method}, 1 thread per process; median of {options.iterations} iterations")
    print(f"{'batch':>5} {'processes':>9} {'s/iter':>8} {'tasks/s':>8} {'speed-up':>8}")
    for batch_size in options.batch_sizes:
        single = None
        for world_size in options.world_sizes:
            seconds = measure(world_size, [*base, f"--batch_size={batch_size}"], options.iterations)
            single = single or seconds
            print(f"{batch_size:>5} {world_size:>9} {seconds:>8.3f} {batch_size / seconds:>8.1f} "
                  f"{single / seconds:>7.2f}x", flush=True)


if __name__ == "__main__":
    main_cli()
