"""The reference's Basic, MAML and MELO, seeded, on a rating file, with every test user's
error recorded as this project records it, so that both codebases can be compared paired.

    python benchmarks/reference_study.py --reference DIR --seed 222 --model bert4rec \\
        --pretrain_epochs 20 --num_train_iterations 300 --out results/ml-100k/reference

DIR is a checkout of the reference (YangYongJin/MELO), imported unmodified as by
reference_parity.py. Its Basic (train_original.py, saving its embedding) runs first, then
MAML and MELO from that embedding (main.py), each tested on its best checkpoint, with the
reference's own flags and defaults plus the ones given here (``--flags`` adds more); a seed
whose two JSON files exist is not run again (an interrupted seed starts over). What it
leaves to chance is seeded from ``--seed``: torch before each run, and numpy where the
reference reseeds it from the clock (its train/valid split; its task draws follow). Its test
users are its draw for ``--random_seed`` — the same users as this project's (see
reference_parity.py) — and each test task's target MSE and MAE, as its test loop computes
them, are kept per user. Written to ``--out``: ``{model}_{method}_seed{seed}.json`` with
``{"metrics": {"rmse", "mae", "num_users", "per_user": {"user", "squared_error",
"absolute_error"}}, ...}``, users numbered as this project numbers them (their sorted ids).
"""
import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_parity import SHARED_ML100K, import_reference, reference_workdir  # noqa: E402


@contextlib.contextmanager
def clock_reseeds_seeded(seed):
    """numpy.random.seed() without a seed (a reseed from the clock) seeds with ``seed``."""
    original = np.random.seed
    np.random.seed = lambda value=None: original(seed if value is None else value)
    try:
        yield
    finally:
        np.random.seed = original


def reference_args(reference, flags):
    """A copy of the reference's parsed options with ``flags`` (``--name=value``) applied."""
    args = argparse.Namespace(**vars(reference.args))
    for flag in flags:
        name, value = flag[2:].split("=", 1)
        current = getattr(args, name)
        setattr(args, name, value == "True" if isinstance(current, bool) else type(current)(value))
    return args


def train_reference_basic(reference, seed, epochs):
    """The reference's Basic with --save_pretrained=True (its embedding and model written under
    its --pretrain_log_dir), torch seeded; call it inside ``clock_reseeds_seeded``."""
    torch.manual_seed(seed)
    basic = reference.train_original.Basic(reference_args(reference, ["--save_pretrained=True"]))
    basic.train(epochs=epochs)
    return basic


def test_per_user(maml):
    """Run the reference's test and keep each test task's target MSE and MAE by user."""
    errors = {}
    inner_loop = maml._inner_loop

    def recording(support, task_info, query_inputs, query_target_rating, train):
        query_loss, query_out_loss, mae_loss = inner_loop(support, task_info, query_inputs,
                                                          query_target_rating, train)
        errors[int(support[0][0])] = (float(query_out_loss), float(mae_loss))
        return query_loss, query_out_loss, mae_loss

    maml._inner_loop = recording
    maml.test()
    raw_ids = {dense: raw for raw, dense in maml.dataloader.umap.items()}
    ours = {raw: rank for rank, raw in enumerate(sorted(maml.dataloader.umap))}  # this project's numbering
    users = sorted(errors, key=lambda dense: ours[raw_ids[dense]])
    squared = [errors[user][0] for user in users]
    absolute = [errors[user][1] for user in users]
    return {"rmse": math.sqrt(float(np.mean(squared))), "mae": float(np.mean(absolute)), "num_users": len(users),
            "per_user": {"user": [ours[raw_ids[user]] for user in users], "squared_error": squared,
                         "absolute_error": absolute}}


def reference_run_parser(description):
    """The flags of a seeded reference run on a rating file (here and reference_embedding.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reference", required=True, help="folder of the reference code (YangYongJin/MELO)")
    parser.add_argument("--data_path", default=str(SHARED_ML100K), help="a ratings.dat (ml-1m layout)")
    parser.add_argument("--model", default="bert4rec")
    parser.add_argument("--seed", type=int, default=222, help="--random_seed, and the seed of torch and numpy")
    parser.add_argument("--num_test_data", type=int, default=150)
    parser.add_argument("--val_size", type=int, default=100)
    parser.add_argument("--pretrain_epochs", type=int, default=20)
    return parser


def main(argv=None):
    parser = reference_run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_train_iterations", type=int, default=300)
    parser.add_argument("--out", required=True, help="folder for the JSON results")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="more flags for the reference's runs, e.g. --flags --log_interval=25")
    options = parser.parse_args(argv)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {method: out / f"{options.model}_{method}_seed{options.seed}.json" for method in ("maml", "melo")}
    if all(path.is_file() for path in paths.values()):
        print(f"done before: {', '.join(map(str, paths.values()))}")
        return 0
    with reference_workdir(options.data_path) as data_flag:
        flags = [data_flag, "--mode=ml-1m", f"--model={options.model}", f"--random_seed={options.seed}",
                 f"--num_test_data={options.num_test_data}", f"--val_size={options.val_size}",
                 f"--pretrain_epochs={options.pretrain_epochs}",
                 f"--num_train_iterations={options.num_train_iterations}", *options.flags]
        reference = import_reference(options.reference, flags)
        with clock_reseeds_seeded(options.seed):
            train_reference_basic(reference, options.seed, options.pretrain_epochs)
            for method, adaptive in (("maml", False), ("melo", True)):
                torch.manual_seed(options.seed)
                np.random.seed(options.seed)
                args = reference_args(reference, [f"--use_adaptive_loss={adaptive}",
                                                  "--load_pretrained_embedding=True", f"--log_dir=log_{method}"])
                maml = reference.main.MAML(args)
                maml.train(options.num_train_iterations)
                maml.load(maml.best_step, best=True)
                metrics = test_per_user(maml)
                record = {"codebase": "reference", "model": options.model, "method": method, "seed": options.seed,
                          "best_step": maml.best_step, "metrics": metrics,
                          "command": " ".join(["python benchmarks/reference_study.py", *map(str, argv or sys.argv[1:])])}
                path = paths[method]
                path.write_text(json.dumps(record, indent=2, allow_nan=False))
                print(f"{method}: test RMSE {metrics['rmse']:.4f}, MAE {metrics['mae']:.4f} "
                      f"(best step {maml.best_step}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
