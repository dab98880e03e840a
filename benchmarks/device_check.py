"""Second-order meta-gradients on an accelerator equal the CPU's.

    python benchmarks/device_check.py [--device cuda] [--data_path ratings.dat]

For every recommender and for MAML and MELO, one outer step on a fixed task batch
(dropout off, 3 second-order inner steps, every step's query loss) is computed on the
CPU in float64 — the reference — and on the device in float64 and float32, through vmap
and through the per-task loop.  Prints the relative error ‖g - g_ref‖ / ‖g_ref‖ of the
concatenated meta-gradient (recommender θ, inner rates α, task-state encoder) and of the
query losses, and exits 1 when one is over its tolerance (1e-9 in float64, 1e-4 in
float32), or when the second-order gradient equals the first-order one.  A last line
per model and method checks, with dropout on, that inner steps recomputed in the
backward (--recompute_inner_steps) replay the device's random draws: the same
meta-gradient in float64 as with their graphs kept.

With --compiled, the models that --compile takes also compute the meta-gradient of the
first outer iteration's objective (meta_learning/meta_gradient.py) compiled, in torch.compile's default
mode and in "reduce-overhead" (CUDA graphs on a GPU), in float64 and float32, against the
same objective eager on the CPU in float64; each line gives the first call's seconds
(compiling) and the median of 5 calls after it.
"""
import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import DataConfig, MethodConfig, ModelConfig, TaskConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from meta_learning.meta_gradient import MetaGradient  # noqa: E402
from meta_learning.meta_learner import MetaLearner  # noqa: E402
from meta_learning.tasks import TaskSampler  # noqa: E402
from models import COMPILED_MODELS, model_factory  # noqa: E402
from options import parse_args  # noqa: E402

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
COMPILE_MODES = ("default", "reduce-overhead")   # torch.compile's; the second captures CUDA graphs
COMPILE_DTYPES = (torch.float64, torch.float32)
SMALL = ["--num_test_data=20", "--val_size=20", "--num_samples=10", "--batch_size=4"]


def outer_gradient(learner, batch, device, dtype, use_vmap, first_order=False):
    """Query losses [T, J] and the meta-gradient (one flat vector) of a fixed batch."""
    learner = copy.deepcopy(learner).to(device=device, dtype=dtype).train()
    batch = batch.to(device)
    for name in ("support_ratings", "query_ratings"):
        setattr(batch, name, getattr(batch, name).to(dtype))
    losses, _ = learner.adapt(learner.task_tensors(batch), range(learner.config.num_inner_steps), first_order=first_order,
                              use_vmap=use_vmap)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(losses.sum(dim=1).mean(), parameters, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for p, g in zip(parameters, gradients)])
    return losses.detach().double().cpu(), flat.double().cpu()


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def objective_gradient(learner, batch, device, dtype, mode=None, calls=6):
    """The meta-loss and meta-gradient (one flat vector) of the first outer iteration's
    objective, eager (``mode`` None) or compiled in ``mode``; the first call's seconds and
    the median of the others'."""
    learner = copy.deepcopy(learner).to(device=device, dtype=dtype).train()
    batch = batch.to(device)
    for name in ("support_ratings", "query_ratings"):
        setattr(batch, name, getattr(batch, name).to(dtype))
    meta_gradient = MetaGradient(learner, compile=mode is not None, mode=mode)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    seconds = []
    for _ in range(calls):
        for p in parameters:
            p.grad = None
        synchronize(device)
        start = time.perf_counter()
        loss, _ = meta_gradient(batch, 0)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in parameters])
    median = statistics.median(seconds[1:] or seconds)
    return loss.detach().double().cpu().reshape(1), flat.double().cpu(), seconds[0], median


def check_compiled(learner, batch, device, model, method):
    """The compiled meta-gradient on ``device`` against the eager one on the CPU in float64;
    a line per mode and dtype, what failed."""
    ref_loss, ref_gradient, _, _ = objective_gradient(learner, batch, "cpu", torch.float64, calls=1)
    failures = []
    for mode in COMPILE_MODES:
        for dtype in COMPILE_DTYPES:
            torch._dynamo.reset()
            loss, gradient, first, median = objective_gradient(learner, batch, device, dtype, mode)
            loss_error, gradient_error = relative_error(loss, ref_loss), relative_error(gradient, ref_gradient)
            ok = max(loss_error, gradient_error) <= TOLERANCE[dtype] and torch.isfinite(gradient).all()
            print(f"{model:<9} {method:<5} {str(dtype)[6:]:<8} compiled, {mode:<15} loss {loss_error:9.2e}  "
                  f"gradient {gradient_error:9.2e}  first call {first:6.1f} s, then {median:.3f} s  "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures.append(f"{dtype} compiled {mode}")
    return failures


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


def check(model, method, data, data_path, device, compiled=False):
    """Compare one model's and method's meta-gradients on ``device`` with the CPU float64
    reference; print a line per dtype and path, return what failed. ``compiled``: also
    check_compiled, for the models that --compile takes."""
    args = parse_args([f"--model={model}", f"--data_path={data_path}", "--bert_dropout=0",
                       f"--use_adaptive_loss={method == 'melo'}", *SMALL])
    torch.manual_seed(0)
    learner = MetaLearner(model_factory(ModelConfig.from_args(args, data.num_items)), MethodConfig.from_args(args))
    batch = TaskSampler(data, TaskConfig.from_args(args)).train_batch(args.batch_size)
    ref_losses, ref_gradient = outer_gradient(learner, batch, "cpu", torch.float64, use_vmap=True)
    _, first_order_gradient = outer_gradient(learner, batch, "cpu", torch.float64, use_vmap=True,
                                             first_order=True)
    failures = []
    if relative_error(first_order_gradient, ref_gradient) < 1e-6:
        failures.append("second-order gradient equals the first-order one")
    for dtype in (torch.float64, torch.float32):
        for use_vmap in (True, False):
            losses, gradient = outer_gradient(learner, batch, device, dtype, use_vmap)
            loss_error = relative_error(losses, ref_losses)
            gradient_error = relative_error(gradient, ref_gradient)
            path = "vmap" if use_vmap else "loop"
            ok = max(loss_error, gradient_error) <= TOLERANCE[dtype] and torch.isfinite(gradient).all()
            print(f"{model:<9} {method:<5} {str(dtype)[6:]:<8} {path:<5} loss {loss_error:9.2e}  "
                  f"gradient {gradient_error:9.2e}  {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures.append(f"{dtype} {path}")
    if not recomputed_steps_replay_dropout(args, data, batch, device):
        failures.append("recomputed steps")
    if compiled and model in COMPILED_MODELS:
        failures += check_compiled(learner, batch, device, model, method)
    return failures


def recomputed_steps_replay_dropout(args, data, batch, device):
    args = copy.copy(args)
    args.bert_dropout = 0.3
    torch.manual_seed(0)
    learner = MetaLearner(model_factory(ModelConfig.from_args(args, data.num_items)), MethodConfig.from_args(args))
    gradients = []
    for recompute_steps in (0, 2):
        learner.config = replace(learner.config, recompute_inner_steps=recompute_steps)
        torch.manual_seed(1)  # the same dropout draws in both runs
        gradients.append(outer_gradient(learner, batch, device, torch.float64, use_vmap=True)[1])
    error = relative_error(gradients[1], gradients[0])
    ok = error <= TOLERANCE[torch.float64]
    print(f"{args.model:<9} {'melo' if args.use_adaptive_loss else 'maml':<5} float64  recomputed steps, "
          f"dropout 0.3: gradient {error:9.2e}  {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "ml-100k" / "ratings.dat"),
                        help="a ratings.dat in the ml-1m layout (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=["bert4rec", "sasrec", "gru4rec", "narm", "ncf"])
    parser.add_argument("--compiled", action="store_true",
                        help=f"also the compiled meta-gradient of {', '.join(COMPILED_MODELS)} (minutes each)")
    options = parser.parse_args()
    print(f"device: {options.device} ({torch.cuda.get_device_name() if options.device.startswith('cuda') else 'CPU'}); "
          f"torch {torch.__version__}; reference: CPU float64, vmap")
    if not Path(options.data_path).is_file():
        sys.exit(f"error: no rating file at {options.data_path}; give --data_path=RATINGS.dat (the ml-1m layout)")
    data = load_data(DataConfig.from_args(parse_args([f"--data_path={options.data_path}", *SMALL])))
    failures = [f"{model} {method}: {failure}" for model in options.models
                for method in ("maml", "melo")
                for failure in check(model, method, data, options.data_path, options.device, options.compiled)]
    print("\n".join(["FAILED:", *failures]) if failures else "all meta-gradients agree")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
