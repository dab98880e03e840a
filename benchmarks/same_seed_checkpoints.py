"""Same seed, same checkpoints: the check for a change that should move no number (a
refactor, modules moved). Every model's Basic, MAML and MELO, and each study variant on
GRU4Rec, train a few steps from one seed on the bundled MovieLens sample; the SHA-256 of
every tensor and number in each checkpoint (all but its flags, which name the folders) is
written to ``digests.json``. Given the folder of an earlier run, the digests are compared
and the earlier checkpoints are tested with this code (old checkpoints must still load),
with the rating file they were trained on (a checkpoint keeps its --data_path).

    python benchmarks/same_seed_checkpoints.py --out /tmp/before        # at the old commit
    python benchmarks/same_seed_checkpoints.py --out /tmp/after --compare /tmp/before

Exits 1 when a digest differs or an old checkpoint does not load. One thread per run, so
that it can run beside a study.
"""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "Data" / "ml-latest-small" / "ratings.csv.gz"
DATA = ["--mode=ml-10m", "--num_test_data=20", "--val_size=10", "--max_seq_len=10", "--num_samples=4",
        "--num_query_set=2", "--random_seed=7"]
SMALL = ["--bert_hidden_units=8", "--bert_num_blocks=1", "--bert_num_heads=2",
         "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8", "--narm_hidden_size=8",
         "--narm_embedding_dim=8", "--lstm_hidden=8", "--lstm_input_size=4"]
BASIC = ["--pretrain_epochs=2", "--pretraining_batch_size=16", "--save_pretrained=True"]
META = ["--num_train_iterations=4", "--log_interval=2", "--batch_size=4", "--load_pretrained_embedding=True"]
MODELS = ("gru4rec", "narm", "sasrec", "bert4rec", "ncf")
METHODS = {"maml": ["--use_adaptive_loss=False"], "melo": []}
VARIANTS = {   # the study variants' flags (study_options.RUN_VARIANTS), on GRU4Rec
    "melo_normalized": ["--normalize_weights=True"],
    "melo_rating_blind": ["--rating_blind_encoder=True"],
    "maml_inverse_frequency": ["--use_adaptive_loss=False", "--inverse_frequency_weights=True"],
    "melo_mlp_encoder": ["--use_lstm=False", "--use_mlp=True"],
    "melo_loss_network": ["--use_mlp_mean=True"],
    "melo_focal": ["--use_focal_loss=True"],
    "melo_softmax": ["--use_softmax=True"],
    "maml_inner_lr_0.01": ["--use_adaptive_loss=False", "--inner_lr=0.01"],
}


def runs():
    """(name, script, flags) of every run, Basic of a model before its meta-training."""
    for model in MODELS:
        yield f"{model}/basic", "train_original.py", [f"--model={model}", *BASIC]
        named = {**METHODS, **(VARIANTS if model == "gru4rec" else {})}
        for name, flags in named.items():
            yield f"{model}/{name}", "main.py", [f"--model={model}", *META, *flags]


def run(script, flags, out, name, data_path, *extra):
    command = [sys.executable, str(ROOT / script), f"--data_path={data_path}", *DATA, *SMALL, *flags,
               f"--pretrain_log_dir={out / 'pretrain' / name.split('/')[0]}", f"--log_dir={out / name}", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MELO_PROGRESS": "lines"})
    if done.returncode != 0:
        sys.exit(f"{name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return done.stdout


def digest(value, into):
    """Feed every tensor, array and number of a checkpoint into ``into``, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            if key != "args":
                into.update(str(key).encode())
                digest(value[key], into)
    elif isinstance(value, (list, tuple)):
        for item in value:
            digest(item, into)
    elif torch.is_tensor(value):
        into.update(f"{value.dtype}{tuple(value.shape)}".encode())
        into.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        into.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
    elif isinstance(value, bytes):
        into.update(value)
    else:
        into.update(repr(value).encode())


def checkpoint_digests(out):
    """{checkpoint path under ``out``: SHA-256 of its content}."""
    found = {}
    for path in sorted(out.rglob("state/*")):
        if path.suffix == ".json" or path.name.startswith("."):
            continue
        wrapper = torch.load(path, map_location="cpu", weights_only=False)   # atomic_files' checked format
        hashed = hashlib.sha256()
        digest(torch.load(io.BytesIO(wrapper["payload"]), map_location="cpu", weights_only=False), hashed)
        found[str(path.relative_to(out))] = hashed.hexdigest()
    return found


def old_checkpoints_load(earlier, data_path):
    """Test each meta-training run of ``earlier`` at its best step with this code."""
    failures = []
    for name, script, flags in runs():
        if script == "main.py":
            output = run(script, flags, earlier, name, data_path, "--test")
            if "RMSE" not in output:
                failures.append(name)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the runs and digests.json")
    parser.add_argument("--compare", type=Path, help="the --out folder of an earlier run")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists: give a new folder")
    for name, script, flags in runs():
        run(script, flags, args.out, name, BUNDLED)
        print(f"trained {name}", flush=True)
    digests = checkpoint_digests(args.out)
    (args.out / "digests.json").write_text(json.dumps({"data_path": str(BUNDLED), "checkpoints": digests}, indent=1))
    print(f"{len(digests)} checkpoints digested")
    if args.compare is None:
        return
    recorded = json.loads((args.compare / "digests.json").read_text())
    earlier = recorded["checkpoints"]
    differ = sorted(path for path in {*earlier, *digests} if earlier.get(path) != digests.get(path))
    print(f"bit-identical: {len(earlier) - len(differ)} of {len(earlier)} checkpoints"
          + (f"; differ: {', '.join(differ)}" if differ else ""), flush=True)
    failures = old_checkpoints_load(args.compare, recorded["data_path"])
    print(f"earlier checkpoints tested with this code: {'all load' if not failures else 'FAILED ' + ', '.join(failures)}")
    sys.exit(1 if differ or failures else 0)


if __name__ == "__main__":
    main()
