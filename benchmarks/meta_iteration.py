"""Seconds per outer meta-training iteration, tasks per second, peak memory, and the
seconds that testing 1,000 users takes.

    python benchmarks/meta_iteration.py                       # every model x MAML/MELO x vmap/loop
    python benchmarks/meta_iteration.py --paths vmap compiled # eager against --compile
    python benchmarks/meta_iteration.py --models bert4rec --methods melo --paths vmap
    python benchmarks/meta_iteration.py --quick               # tiny sizes, a few iterations (CI)
    python benchmarks/meta_iteration.py --reference DIR       # and the reference code's MELO beside ours

Each configuration runs in a fresh subprocess, so its peak memory is its own (RSS on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU).  Data: ``--data_path``, by default
``../shared/data/ml-100k`` (through the ml-1m reader).  The
configuration is the default one (16 tasks, 25 support sequences of length 30, 3 second-
order inner steps, multi-step loss) unless ``--flags`` adds others.

With ``--reference DIR`` (a checkout of YangYongJin/MELO, imported unmodified as by
reference_parity.py) each model's MELO also runs in the reference's own code, in the same
configuration (its defaults, float32): the seconds of its outer loop on a task batch that
its own dataloader drew (the drawing not timed, as ours is not), and its peak RSS.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "ratings.dat"
QUICK_FLAGS = ["--max_seq_len=10", "--num_samples=5", "--batch_size=4", "--bert_hidden_units=8",
               "--bert_num_heads=2", "--gru4rec_hidden_size=8", "--narm_hidden_size=8"]


def profile_step(trainer, batch, device):
    """torch.profiler's table of one train step: the ops with the most self time, and
    on a GPU the number of kernels launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = profiler.key_averages()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in profiler.events() if e.device_type.name == "CUDA")
    return f"kernels launched: {kernels}\n" + events.table(sort_by=sort_by, row_limit=15)


def time_evaluation(trainer, device):
    """Seconds to adapt to and score 1,000 test users (validation and testing: no outer
    graph), from the time taken on this data's fixed test tasks."""
    import torch

    test_tasks = trainer.sampler.fixed_tasks("test")
    trainer.evaluate(test_tasks[:8])  # warm-up
    start = time.perf_counter()
    trainer.evaluate(test_tasks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / len(test_tasks)


def measure(model, method, path, data_path, flags, warmup, iterations, profile=False):
    """Time train steps of one configuration in this process; return a result dict."""
    import torch

    import main
    from config import DataConfig, MetaRunConfig
    from dataloader import load_data
    from options import parse_args

    args = parse_args([f"--model={model}", f"--data_path={data_path}", "--num_test_data=150",
                       "--val_size=100", f"--use_adaptive_loss={method == 'melo'}",
                       f"--use_vmap={path != 'loop'}", f"--compile={path == 'compiled'}", *flags])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_data(DataConfig.from_args(args))
    trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, device)
    seconds, first_step = [], None
    for i in range(warmup + iterations):
        batch = trainer.sampler.train_batch(args.batch_size).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        elif i == 0:
            first_step = time.perf_counter() - start   # with --compile: compiling the graph
    median = statistics.median(seconds)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    evaluation = time_evaluation(trainer, device) if path == "vmap" else None
    table = profile_step(trainer, batch, device) if profile else None
    return {"model": model, "method": method, "path": path, "device": str(device),
            "seconds": median, "tasks_per_second": args.batch_size / median, "peak_mib": memory,
            "first_step_seconds": first_step, "evaluation_seconds_per_1000_users": evaluation,
            "graphs": trainer.meta_gradient.graphs_compiled if path == "compiled" else None,
            "threads": torch.get_num_threads(), "profile": table}


def measure_reference(directory, model, data_path, warmup, iterations):
    """Time the reference implementation's MELO outer loop (its own code and defaults) on task
    batches that its dataloader draws; return a result dict like ``measure``'s."""
    import torch

    from reference_parity import import_reference, quietly, reference_workdir

    with reference_workdir(data_path) as data_flag:
        reference = import_reference(directory, [f"--model={model}", "--mode=ml-1m", data_flag,
                                                 "--num_test_data=150", "--val_size=100"])
        args = reference.args
        maml = quietly(reference.main.MAML, args)
        seconds = []
        for i in range(warmup + iterations):
            tasks = maml.dataloader.generate_task(mode="train", batch_size=args.batch_size,
                                                  normalized=args.normalize_loss, use_label=args.use_label)
            maml._train_step += 1  # what its train() does before each outer loop
            start = time.perf_counter()
            quietly(maml._outer_loop, tasks, train=True)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"model": model, "method": "melo", "path": "reference", "device": "cpu", "seconds": median,
            "tasks_per_second": args.batch_size / median, "first_step_seconds": None,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "evaluation_seconds_per_1000_users": None, "graphs": None, "threads": torch.get_num_threads(),
            "profile": None}


def run_child(command, workdir, label):
    """Run one measuring child process; its result dict, or None after printing its error."""
    run = subprocess.run(command, capture_output=True, text=True, cwd=workdir,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        print(f"{label} failed:\n{run.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def print_result(r):
    evaluation, first = r["evaluation_seconds_per_1000_users"], r["first_step_seconds"]
    print(f"{r['model']:<9} {r['method']:<5} {r['path']:<9} {r['seconds']:>8.3f} "
          f"{r['tasks_per_second']:>8.1f} {r['peak_mib']:>9.0f} "
          f"{'-' if evaluation is None else f'{evaluation:.1f}':>16} "
          f"{'-' if first is None else f'{first:.1f}':>12} {'-' if r['graphs'] is None else r['graphs']:>6}",
          flush=True)
    if r["profile"]:
        print(r["profile"], flush=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert4rec", "sasrec", "gru4rec", "narm"])
    parser.add_argument("--methods", nargs="+", default=["maml", "melo"])
    parser.add_argument("--paths", nargs="+", default=["vmap", "loop"], choices=["vmap", "loop", "compiled"],
                        help="eager vmap, eager per-task loop, --compile (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 iterations")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of one step")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="more main.py flags, e.g. --flags --first_order=True")
    parser.add_argument("--reference", metavar="DIR", help="also time the reference code's MELO (a checkout of it)")
    parser.add_argument("--single", nargs=3, metavar=("MODEL", "METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--single_reference", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--data_path", default=str(SHARED_ML100K),
                        help="a ratings.dat in the ml-1m layout (default: %(default)s)")
    return parser


def child_commands(options, data_path):
    """(label, command) of each configuration's own process, in the order of the table."""
    timing = [f"--data_path={data_path}", f"--warmup={options.warmup}", f"--iterations={options.iterations}"]
    extra = [*(["--quick"] if options.quick else []), *(["--profile"] if options.profile else []),
             *(["--flags", *options.flags] if options.flags else [])]
    for model in options.models:
        for method in options.methods:
            for path in options.paths:
                yield (f"{model:<9} {method:<5} {path:<9}",
                       [sys.executable, __file__, "--single", model, method, path, *timing, *extra])
        if options.reference:
            yield (f"{model:<9} melo  reference", [sys.executable, __file__, "--single_reference", model,
                                                   f"--reference={Path(options.reference).resolve()}", *timing])


def main():
    options = build_parser().parse_args()
    flags = options.flags + (QUICK_FLAGS if options.quick else [])
    if options.quick:
        options.warmup, options.iterations = 1, 2
    if options.single:  # the child process: measure one configuration, print JSON
        result = measure(*options.single, options.data_path, flags, options.warmup, options.iterations,
                         options.profile)
        print("RESULT " + json.dumps(result))
        return
    if options.single_reference:
        result = measure_reference(options.reference, options.single_reference, options.data_path,
                                   options.warmup, options.iterations)
        print("RESULT " + json.dumps(result))
        return

    data_path = Path(options.data_path).resolve()
    if not data_path.is_file():
        sys.exit(f"error: no rating file at {data_path}; give --data_path=RATINGS.dat (the ml-1m layout)")
    with tempfile.TemporaryDirectory() as workdir:
        print(f"data: {data_path}; flags: {' '.join(flags) or '(defaults)'}")
        print(f"{'model':<9} {'method':<5} {'path':<9} {'s/iter':>8} {'tasks/s':>8} {'peak MiB':>9} "
              f"{'test s/1k users':>16} {'first step s':>12} {'graphs':>6}")
        results = []
        for label, command in child_commands(options, data_path):
            results.append(run_child(command, workdir, label))
            if results[-1]:
                print_result(results[-1])
        failures = results.count(None)
        results = [r for r in results if r]
        if results:
            print(f"device: {results[-1]['device']}; torch threads: {results[-1]['threads']}")
    if failures:
        sys.exit(f"{failures} configuration(s) failed")


if __name__ == "__main__":
    main()
