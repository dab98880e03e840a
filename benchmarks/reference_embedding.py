"""The reference's Basic embedding, seeded, written where this project's main.py looks for a
pretrained embedding, so that our MAML and MELO can start from exactly what the reference's
start from.

    python benchmarks/reference_embedding.py --reference DIR --model bert4rec --seed 222 \\
        --pretrain_log_dir /tmp/reference_basic
    python main.py --mode=ml-1m --data_path=../shared/data/ml-100k/ratings.dat --num_test_data=150 \\
        --val_size=100 --model=bert4rec --random_seed=222 --pretrain_log_dir=/tmp/reference_basic \\
        --load_pretrained_embedding=True ...

DIR is a checkout of the reference (YangYongJin/MELO), imported unmodified as by
reference_parity.py. Its Basic (train_original.py --save_pretrained=True) runs as
reference_study.py runs it (torch and its clock reseeds of numpy seeded from ``--seed``), and
the embedding it saved — that of the epoch its validation chose — is renamed into this
project's layout (the name map of reference_parity.py; its item table has one unused row
more) and saved with the identity of a run with the same data flags, in the run folder
that main.py computes for ``--pretrain_log_dir``. The data flags given here (and only
these) must be given to main.py too.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from config import DataConfig, ModelConfig, RunFilesConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from models import model_factory  # noqa: E402
from options import parse_args  # noqa: E402
from run.atomic_files import save_checked  # noqa: E402
from run.start import make_dirs  # noqa: E402
from reference_parity import NAMES, fit, import_reference, our_name, reference_workdir  # noqa: E402
from reference_study import clock_reseeds_seeded, reference_run_parser, train_reference_basic  # noqa: E402
from run.run_files import pretrained_paths, run_identity  # noqa: E402

# where each reference model keeps the embedding that its Basic saves
EMBEDDING_MODULE = {"bert4rec": "bert.bert_embedding.", "sasrec": "bert.bert_embedding."}


def in_our_layout(reference_state, model_name, ours):
    """The reference's embedding state as our model's ``embedding`` state (``ours``)."""
    prefix = EMBEDDING_MODULE.get(model_name, "embedding.")
    state = {}
    for name, tensor in reference_state.items():
        target = our_name(prefix + name, NAMES[model_name])   # e.g. embedding.items.weight
        key = target.removeprefix("embedding.")
        if key == target or key not in ours:
            raise KeyError(f"the reference's embedding tensor {name} maps to {target}, which our embedding lacks")
        state[key] = fit(target, tensor, ours[key]).clone()
    if state.keys() != ours.keys():
        raise KeyError(f"no reference tensor maps to {sorted(set(ours) - set(state))}")
    return state


def main(argv=None):
    parser = reference_run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain_log_dir", required=True, help="main.py's --pretrain_log_dir")
    options = parser.parse_args(argv)
    data_flags = [f"--data_path={Path(options.data_path).resolve()}", "--mode=ml-1m", f"--model={options.model}",
                  f"--random_seed={options.seed}", f"--num_test_data={options.num_test_data}",
                  f"--val_size={options.val_size}"]
    ours = parse_args([*data_flags, f"--pretrain_log_dir={Path(options.pretrain_log_dir).resolve()}"])
    num_items = load_data(DataConfig.from_args(ours)).num_items
    our_embedding = model_factory(ModelConfig.from_args(ours, num_items)).embedding.state_dict()
    with reference_workdir(options.data_path) as data_flag:
        reference = import_reference(options.reference, [data_flag, *data_flags[1:],
                                                         f"--pretrain_epochs={options.pretrain_epochs}"])
        with clock_reseeds_seeded(options.seed):
            basic = train_reference_basic(reference, options.seed, options.pretrain_epochs)
        saved = [path for path in Path(basic._embedding_dir).iterdir() if path.is_file()]
        reference_state = torch.load(saved[0], map_location="cpu")
    path = pretrained_paths(RunFilesConfig.from_args(ours))["embedding"]
    make_dirs(path.parent)
    save_checked({"identity": run_identity(RunFilesConfig.from_args(ours)),
                 "state": in_our_layout(reference_state, options.model, our_embedding)}, path)
    print(f"the reference's Basic chose epoch {basic.best_step + 1} of {options.pretrain_epochs} "
          f"(validation RMSE {basic.best_valid_rmse_loss:.4f}); its embedding -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
