"""Side by side with the reference implementation: the same data, the same models, the same
meta-gradients.

    python benchmarks/reference_parity.py --reference DIR [--data_path ratings.dat]

DIR is a checkout of the reference code (YangYongJin/MELO on GitHub); it is imported as it
is, never edited: ``wandb`` and ``wget`` are replaced by empty modules and its ``options``
reads the command line that this script sets. It runs in a temporary working directory
whose ``Data/ml-1m`` holds a link to the rating file, so the reference downloads nothing.

1. **Data.** Both codebases read the file (``--mode=ml-1m``): users, items and ratings after
   filtering, the sequences (same items in the same order per user), the test users drawn
   for ``--random_seed`` and how many test targets coincide.
2. **Models and meta-gradients.** For every model and for MAML, MELO (LSTM encoder) and
   MELO with the MLP encoder, the reference's learner is built, its initial parameters
   (recommender, encoder, inner learning rates) are copied into ours through a name map,
   and both run in float64 with dropout off on the same task batch: the predictions for
   the same item sequences, the LSTM weights, the support loss, the query loss after each
   inner step and the meta-gradient of one outer step (every step's query loss, second
   order), and how every parameter moves over ``--iterations`` whole training iterations,
   each on tasks of its own (the MAML++ step weights, gradient clipping, the Adam steps and
   moments, the schedulers, run ``--iterations`` long). Each is reported as the
   relative error ||ours - reference|| / ||reference||; the script exits 1 when one
   exceeds ``--tolerance``. ``--flags`` adds settings to both (e.g. the ablations).
3. **Initialisation.** Each codebase's own initialisation (5 seeds): the standard deviation
   of every parameter tensor, and how far one plain gradient step at ``--inner_lr`` on a
   user's support set moves the predictions (mean |change| in stars at real positions).
"""
import argparse
import contextlib
import copy
import io
import math
import os
import re
import sys
import tempfile
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import DataConfig, MetaRunConfig, MethodConfig, ModelConfig, TaskConfig  # noqa: E402
from dataloader import load_data  # noqa: E402
from inner_loop_optimizers import _key  # noqa: E402
from main import MetaTrainer  # noqa: E402
from meta_learning.inner_loop_execution import one_task  # noqa: E402
from meta_learning.meta_learner import MetaLearner  # noqa: E402
from meta_learning.tasks import TaskSampler  # noqa: E402
from models import model_factory  # noqa: E402
from options import MODELS, parse_args  # noqa: E402

SHARED_ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "ratings.dat"
SHARED_FLAGS = ["--mode=ml-1m", "--num_test_data=150", "--bert_dropout=0"]
METHODS = {"maml": ["--use_adaptive_loss=False"],
           "melo": [],
           "melo-mlp": ["--use_lstm=False", "--use_mlp=True"]}
OUR_FLAGS = ["--val_size=100", "--normalize_weights=False"]  # the reference's unnormalised weights
# The reference's module names, which are also ours: imported under them, then set aside.
REFERENCE_MODULES = ("main", "options", "dataloader", "inner_loop_optimizers", "models", "train_original")

# Reference parameter name -> ours, per model family (regular expressions, applied in order).
TRANSFORMER_NAMES = [
    (r"^bert\.bert_embedding\.embedding\.weights$", "embedding.items.weight"),
    (r"^bert\.bert_embedding\.position\.weights$", "embedding.positions.weight"),
    (r"^bert\.layer_dict\.transformer(\d+)\.", r"blocks.\1."),
    (r"attention\.layer_dict\.in_linear0\.", "attn.query."),
    (r"attention\.layer_dict\.in_linear1\.", "attn.key."),
    (r"attention\.layer_dict\.in_linear2\.", "attn.value."),
    (r"attention\.layer_dict\.out_linear\.", "attn.out."),
    (r"feed_forward\.linear1\.", "ffn.0."), (r"feed_forward\.linear2\.", "ffn.3."),
    (r"input_sublayer\.norm\.", "attn_norm."), (r"output_sublayer\.norm\.", "ffn_norm."),
    (r"\.a_2$", ".weight"), (r"\.b_2$", ".bias"),
    (r"^dim_reduct\.", "head."),
]
GRU_NAMES = [
    (r"^embedding\.embedding\.weights$", "embedding.items.weight"),
    (r"^gru\.layer_dict\.gru(\d+)\.x2h\.", r"gru.layers.\1.input_proj."),
    (r"^gru\.layer_dict\.gru(\d+)\.h2h\.", r"gru.layers.\1.hidden_proj."),
    (r"^gru\.layer_dict\.fc\.", "project."),
    (r"^gru\.h0$", "gru.initial_states"),
    (r"^out_layer\.", "head."), (r"^a_1\.", "a1."), (r"^a_2\.", "a2."), (r"^v_t\.", "v."),
]
NCF_NAMES = [
    (r"^bert_embedding\.embedding\.weights$", "embedding.items.weight"),
    (r"^bert_embedding\.position\.weights$", "embedding.positions.weight"),
    (r"^layer_dict\.linear(\d+)\.", r"tower.\1."),
]
NAMES = {"bert4rec": TRANSFORMER_NAMES, "sasrec": TRANSFORMER_NAMES, "gru4rec": GRU_NAMES,
         "narm": GRU_NAMES, "ncf": NCF_NAMES}
ENCODER_NAMES = [(r"^embedding\.", "rating_embedding."), (r"^h0$", "initial_hidden"),
                 (r"^c0$", "initial_cell"), (r"^out_net\.", "head.")]


def our_name(name, renames):
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return re.sub(r"\.weights$", ".weight", name)


def fit(name, tensor, like):
    """A reference tensor in the shape of ours (``like``, which also fills what it lacks).

    Its item vocabulary has one row more (num_items + 2; the last is never used); its rating
    embedding has 7 rows for int(rating), ours 11 for round(2 * rating): its row k is our 2k.
    """
    if name == "embedding.items.weight":
        return tensor[:like.shape[0]]
    if name == "rating_embedding.weight":
        spread = like.clone()
        spread[0::2] = tensor[:6]
        return spread
    return tensor.reshape(like.shape)


def mapped(reference_tensors, renames, ours, fill):
    """{our name: tensor} from {reference name: tensor}; ``fill(ours)`` for what it lacks."""
    out = {}
    for name, tensor in reference_tensors.items():
        target = our_name(name, renames)
        if target not in ours:
            raise KeyError(f"reference tensor {name} maps to {target}, which this project does not have")
        out[target] = fit(target, tensor, fill(ours[target]))
    missing = set(ours) - set(out)
    if missing:
        raise KeyError(f"no reference tensor maps to {sorted(missing)}")
    return out


# --------------------------------------------------------------------------------------
# The reference, imported from outside
# --------------------------------------------------------------------------------------
def import_reference(directory, argv):
    """The reference's modules, imported with ``argv`` as their command line and then
    removed from sys.modules again, so that ours keep their names."""
    directory = Path(directory).resolve()
    if not (directory / "main.py").is_file() or not (directory / "models" / "meta_bert_model.py").is_file():
        sys.exit(f"error: --reference={directory} is not a checkout of the reference (no main.py, "
                 "models/meta_bert_model.py); clone YangYongJin/MELO and pass its folder")
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] in REFERENCE_MODULES}
    for name in ours:
        del sys.modules[name]
    stubs = {"wandb": types.ModuleType("wandb"), "wget": types.ModuleType("wget")}
    stubs["wandb"].init = stubs["wandb"].log = lambda *args, **kwargs: None
    stubs["wandb"].config = types.SimpleNamespace(update=lambda *args, **kwargs: None)
    sys.modules.update(stubs)
    saved_argv, sys.argv = sys.argv, ["main.py", *argv]
    sys.path.insert(0, str(directory))
    try:
        import main as reference_main  # noqa: PLC0415  (the reference's main.py)
        import models as reference_models  # noqa: PLC0415
        import train_original as reference_basic  # noqa: PLC0415
        reference = types.SimpleNamespace(main=reference_main, models=reference_models,
                                          train_original=reference_basic, args=reference_main.args)
    finally:
        sys.path.remove(str(directory))
        sys.argv = saved_argv
        for name in [n for n in sys.modules if n.split(".")[0] in REFERENCE_MODULES]:
            del sys.modules[name]
        sys.modules.update(ours)
    return reference


@contextlib.contextmanager
def reference_workdir(data_path):
    """A temporary working directory whose ``Data/ml-1m`` holds a link to ``data_path`` (and
    the other file names the reference checks before it would download ML-1M); yields the
    ``--data_path`` flag for both codebases. The reference reads and writes under ./Data."""
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir) / "Data" / "ml-1m"
        folder.mkdir(parents=True)
        (folder / "ratings.dat").symlink_to(Path(data_path).resolve())
        for name in ("README", "movies.dat", "users.dat"):
            (folder / name).touch()
        os.chdir(workdir)
        try:
            yield f"--data_path={folder / 'ratings.dat'}"
        finally:
            os.chdir(ROOT)


def quietly(function, *args, **kwargs):
    """Call ``function`` with its prints and progress bars captured."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


def reference_learner(reference, flags):
    """The reference's MAML object for these flags, in float64."""
    args = copy.copy(reference.args)
    for flag in flags:
        name, value = flag[2:].split("=")
        current = getattr(args, name)
        setattr(args, name, value == "True" if isinstance(current, bool) else type(current)(value))
    maml = quietly(reference.main.MAML, args)
    for module in (maml.model, maml.inner_loop_optimizer, getattr(maml, "task_lstm_network", None),
                   getattr(maml, "task_info_network", None), getattr(maml, "loss_network", None)):
        if module is not None:
            module.double()
    return maml


def reference_task(maml, batch, t):
    """Task ``t`` of our TaskBatch in the reference's form (support, query, task_info), without
    our all-padding rows."""
    def split(items, ratings):
        real = items[:, -1] > 0
        items, ratings = items[real], ratings[real].double()
        users = batch.users[t].repeat(len(items), 1)
        return (users, items[:, :-1], items[:, -1:], ratings[:, :-1], ratings[:, -1:]), ratings

    support, support_ratings = split(batch.support_items[t], batch.support_ratings[t])
    query, _ = split(batch.query_items[t], batch.query_ratings[t])
    task_info = maml.dataloader.make_rating_info(support_ratings, normalized=True).double()
    return support, query, task_info


def reference_outer_step(maml, tasks, num_inner_steps):
    """Run the reference's outer loop on ``tasks``, recording each inner step's support
    loss and each step's query loss; every step's query loss weighs 1 and the backward
    stops before clipping and the optimiser steps."""
    records = {"support": [], "query": []}
    apply_inner_loop_update, query_forward = maml.apply_inner_loop_update, maml.query_forward

    def recording_update(loss, **kwargs):
        records["support"].append(loss.detach())
        return apply_inner_loop_update(loss=loss, **kwargs)

    def recording_query(*args, **kwargs):
        outputs = query_forward(*args, **kwargs)
        records["query"].append(outputs[0].detach())
        return outputs

    maml.apply_inner_loop_update, maml.query_forward = recording_update, recording_query
    maml.get_per_step_loss_importance_vector = lambda: torch.ones(num_inner_steps, dtype=torch.float64)
    maml.update_meta_params = lambda loss: loss.backward()
    quietly(maml._outer_loop, tasks, train=True)
    shape = (len(tasks), num_inner_steps)
    return (torch.stack(records["support"]).reshape(shape), torch.stack(records["query"]).reshape(shape))


# --------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------
def compare_data(maml, data):
    reference = maml.dataloader
    users = {dense: raw for raw, dense in reference.umap.items()}
    items = {dense: raw for raw, dense in reference.smap.items()}
    our_user = {raw: u for u, raw in enumerate(data.user_ids.tolist())}
    same_sequences = 0
    for row in reference.df.itertuples():
        u = our_user[users[row.user_id]]
        same_sequences += ([items[i] for i in row.product_id] == data.item_ids[data.item_seqs[u] - 1].tolist()
                           and list(row.rating) == data.rating_seqs[u].tolist())
    reference_test = {users[u] for u in reference.test_set.user_id}
    our_test = set(data.user_ids[data.test_users].tolist())
    common = reference_test & our_test
    reference_targets = {users[row.user_id]: (items[row.product_id[-1]], row.rating[-1])
                         for row in reference.test_set.itertuples()}
    same_targets = sum(reference_targets[user] == (data.item_ids[data.item_seqs[our_user[user]][-1] - 1],
                                                   data.rating_seqs[our_user[user]][-1])
                       for user in common)
    num_ratings = int(sum(len(r) for r in reference.df.rating))
    print("1. Data (reference | ours)")
    print(f"   users {len(reference.umap)} | {data.num_users}, items {len(reference.smap)} | {data.num_items}, "
          f"ratings {num_ratings} | {data.stats['num_ratings']}")
    print(f"   identical sequences: {same_sequences} of {len(reference.df)} users")
    print(f"   test users: {len(reference_test)} | {len(our_test)}, the same {len(common)}; "
          f"test targets (last item and rating) that coincide: {same_targets} of {len(common)}")
    return (len(reference.umap) == data.num_users and len(reference.smap) == data.num_items
            and same_sequences == len(reference.df) and same_targets == len(common) == len(reference_test))


# --------------------------------------------------------------------------------------
# 2. Models and meta-gradients
# --------------------------------------------------------------------------------------
def relative_error(ours, reference):
    ours, reference = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return ((ours - reference).norm() / reference.norm().clamp(min=1e-300)).item()


def our_learner(args, maml, model_name, num_items, learner=None):
    """Our learner (a new one, or ``learner``) in float64 with the reference learner's
    initial parameters."""
    learner = (learner or MetaLearner(model_factory(ModelConfig.from_args(args, num_items)),
                                      MethodConfig.from_args(args))).double()
    renames = NAMES[model_name]
    model_params = dict(learner.model.named_parameters())
    state = mapped(dict(maml.model.named_parameters()), renames, model_params, fill=lambda p: p)
    learner.model.load_state_dict({name: tensor.detach() for name, tensor in state.items()})
    if learner.encoder is not None:
        encoder_state = mapped(dict(maml.task_lstm_network.named_parameters()), ENCODER_NAMES,
                               dict(learner.encoder.named_parameters()), fill=lambda p: p)
        learner.encoder.load_state_dict({name: tensor.detach() for name, tensor in encoder_state.items()})
    if learner.task_info_mlp is not None:
        learner.task_info_mlp.load_state_dict(maml.task_info_network.state_dict())
    rates = maml.inner_loop_optimizer.names_learning_rates_dict
    with torch.no_grad():
        for name, rate in rates.items():
            learner.inner_optimizer.rates[_key(our_name(name.replace("-", "."), renames))].copy_(
                rate[:args.num_inner_steps])
    return learner


def gradient_of(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def in_our_layout(maml, learner, model_name, num_inner_steps, value, fill):
    """``value(p)`` of each of the reference learner's meta-parameters, in our names and
    shapes, as one flat vector in the order of ``learner.parameters()``; ``fill(ours)``
    where the reference has nothing."""
    renames = NAMES[model_name]
    model = mapped({n: value(p) for n, p in maml.model.named_parameters()}, renames,
                   dict(learner.model.named_parameters()), fill=fill)
    flat = {f"model.{n}": v for n, v in model.items()}
    if learner.encoder is not None:
        encoder = mapped({n: value(p) for n, p in maml.task_lstm_network.named_parameters()}, ENCODER_NAMES,
                         dict(learner.encoder.named_parameters()), fill=fill)
        flat.update({f"encoder.{n}": v for n, v in encoder.items()})
    if learner.task_info_mlp is not None:
        flat.update({f"task_info_mlp.{n}": value(p) for n, p in maml.task_info_network.named_parameters()})
    for name, rate in maml.inner_loop_optimizer.names_learning_rates_dict.items():
        ours = _key(our_name(name.replace("-", "."), renames))
        flat[f"inner_optimizer.rates.{ours}"] = value(rate)[:num_inner_steps]
    return torch.cat([flat[name].flatten() for name, p in learner.named_parameters() if p.requires_grad])


def our_parameters(learner):
    """Every meta-parameter of our learner, one flat vector."""
    return torch.cat([p.detach().flatten() for p in learner.parameters() if p.requires_grad])


def compare_training(reference, flags, model_name, data, num_tasks, iterations):
    """How every meta-parameter moves in ``iterations`` whole training iterations of each
    codebase, each on its own ``num_tasks`` test tasks: after each iteration, the relative
    error of the change from the start. Run with schedules of ``iterations`` steps and the
    multi-step loss ending half-way, so the cosine rates reach their ends and both kinds of
    outer loss are taken."""
    schedule = [f"--num_train_iterations={iterations}", f"--multi_step_loss_num_epochs={max(1, iterations // 2)}"]
    maml = reference_learner(reference, [*flags, *schedule])
    args = parse_args([*flags, *schedule, *OUR_FLAGS])
    trainer = MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
    our_learner(args, maml, model_name, data.num_items, trainer.learner)
    tasks = TaskSampler(data, TaskConfig.from_args(args)).fixed_tasks("test")
    tasks.support_ratings, tasks.query_ratings = tasks.support_ratings.double(), tasks.query_ratings.double()
    initial = our_parameters(trainer.learner).clone()
    errors = []
    for iteration in range(iterations):
        batch = tasks[iteration * num_tasks:(iteration + 1) * num_tasks]
        maml._train_step += 1  # what its train() does before each outer loop
        quietly(maml._outer_loop, [reference_task(maml, batch, t) for t in range(len(batch))], train=True)
        trainer.train_step(batch)
        theirs = in_our_layout(maml, trainer.learner, model_name, args.num_inner_steps,
                               value=lambda p: p.detach(), fill=lambda p: p.detach())
        errors.append(relative_error(our_parameters(trainer.learner) - initial, theirs - initial))
    return errors


def compare_learners(reference, model_name, method, data_flags, num_tasks, iterations, extra_flags=()):
    flags = [f"--model={model_name}", *data_flags, *SHARED_FLAGS, *METHODS[method], *extra_flags]
    maml = reference_learner(reference, flags)
    args = parse_args([*flags, *OUR_FLAGS])
    data = quietly(load_data, DataConfig.from_args(args))
    learner = our_learner(args, maml, model_name, data.num_items)
    J = args.num_inner_steps
    batch = TaskSampler(data, TaskConfig.from_args(args)).fixed_tasks("test")[:num_tasks]
    batch.support_ratings, batch.query_ratings = batch.support_ratings.double(), batch.query_ratings.double()
    tasks = [reference_task(maml, batch, t) for t in range(num_tasks)]
    errors = {}

    # predictions for the same item sequences: every real query row of the batch
    real = batch.query_items[..., -1] > 0
    query_items = batch.query_items[real]
    reference_inputs = (torch.zeros(len(query_items), 1, dtype=torch.long), query_items[:, :-1], query_items[:, -1:],
                        batch.query_ratings[real][:, :-1])
    maml.model.eval(), learner.eval()
    with torch.no_grad():
        errors["predictions"] = relative_error(learner.model(query_items), maml.model(reference_inputs))
        prepared = learner.with_encoder_weights(learner.task_tensors(batch))
        if learner.encoder is not None:
            ratings = batch.support_ratings[0][batch.support_items[0][:, -1] > 0]
            reference_weights = maml.task_lstm_network(ratings)
            our_weights = learner.encoder(ratings, (ratings > 0).double())
            errors["lstm weights"] = relative_error(our_weights[ratings > 0], reference_weights[ratings > 0])
    # one outer step, dropout off (bert_dropout=0) in train mode
    maml.model.train(), learner.train()
    reference_support, reference_query = reference_outer_step(maml, tasks, J)
    params = dict(learner.model.named_parameters())
    our_support = torch.stack([learner.support_loss(params, 0, one_task(prepared, t)) for t in range(num_tasks)])
    errors["support loss"] = relative_error(our_support, reference_support[:, 0])
    query_losses, _ = learner.adapt(learner.task_tensors(batch), range(J))
    query_losses.sum(dim=1).mean().backward()
    for step in range(J):
        errors[f"query loss {step + 1}"] = relative_error(query_losses[:, step].detach(), reference_query[:, step])
    our_gradient = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                              for p in learner.parameters() if p.requires_grad])
    theirs = in_our_layout(maml, learner, model_name, J, value=gradient_of, fill=torch.zeros_like)
    errors["meta-gradient"] = relative_error(our_gradient, theirs)
    updates = compare_training(reference, flags, model_name, data, num_tasks, iterations)
    errors["update"] = updates[0]
    errors[f"{iterations} iterations"] = max(updates)
    return errors


# --------------------------------------------------------------------------------------
# 3. Initialisation
# --------------------------------------------------------------------------------------
def one_step_move(predict, params, items, ratings, lr):
    """Mean |change| in stars at the real positions after one gradient step on the masked MSE."""
    mask = (items > 0).double()
    with torch.enable_grad():
        loss = (((predict(params) - ratings / 5) ** 2) * mask).sum() / mask.sum()
        gradients = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    stepped = {name: p - lr * (0 if g is None else g) for (name, p), g in zip(params.items(), gradients)}
    with torch.no_grad():
        return (((predict(stepped) - predict(params)).abs() * mask).sum() / mask.sum()).item() * 5


def spread(tensor):
    """Mean and standard deviation of a parameter tensor's entries ([2]; std 0 for one entry)."""
    tensor = tensor.detach().flatten()
    return torch.stack([tensor.mean(), tensor.std() if len(tensor) > 1 else torch.zeros(())])


def initialisation(reference, model_name, data_flags, seeds):
    flags = [f"--model={model_name}", *data_flags, *SHARED_FLAGS]
    args = parse_args([*flags, *OUR_FLAGS])
    data = quietly(load_data, DataConfig.from_args(args))
    reference_args = copy.copy(reference.args)
    reference_args.model, reference_args.num_items, reference_args.num_users = args.model, data.num_items, data.num_users
    reference_args.device = "cpu"  # set by the reference's MAML, read by its NARM
    support = TaskSampler(data, TaskConfig.from_args(args)).fixed_tasks("test")[:1]
    real = support.support_items[0][:, -1] > 0
    items, ratings = support.support_items[0][real], support.support_ratings[0][real].double()
    inputs = (torch.zeros(len(items), 1, dtype=torch.long), items[:, :-1], items[:, -1:], ratings[:, :-1])
    moves, stds = {"reference": [], "ours": []}, {}
    for seed in seeds:
        torch.manual_seed(seed)
        theirs = reference.models.model_factory(copy.copy(reference_args)).double().eval()
        ours = model_factory(replace(ModelConfig.from_args(args, data.num_items), model_init_seed=seed)).double().eval()
        their_params = dict(theirs.named_parameters())
        moves["reference"].append(one_step_move(lambda p: theirs(inputs, params=p), their_params, items, ratings,
                                                args.inner_lr))
        moves["ours"].append(one_step_move(lambda p: functional_call(ours, p, (items,)), dict(ours.named_parameters()),
                                           items, ratings, args.inner_lr))
        their_stds = mapped({n: spread(p) for n, p in their_params.items()}, NAMES[model_name],
                            {n: torch.zeros(2) for n, _ in ours.named_parameters()}, fill=lambda p: p)
        for name, p in ours.named_parameters():
            stds.setdefault(name, []).append((spread(p), their_stds[name]))
    return moves, stds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="folder of the reference code (YangYongJin/MELO)")
    parser.add_argument("--data_path", default=str(SHARED_ML100K), help="a ratings.dat (ml-1m layout)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num_tasks", type=int, default=4, help="tasks in the compared outer step")
    parser.add_argument("--iterations", type=int, default=10,
                        help="whole training iterations compared, each on its own tasks (the largest "
                        "error over them is reported)")
    parser.add_argument("--seeds", type=int, default=5, help="initialisations for the statistics")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="more flags for both codebases, e.g. --flags --use_focal_loss=True")
    options = parser.parse_args(argv)
    data_path = Path(options.data_path).resolve()
    if not data_path.is_file():
        sys.exit(f"error: --data_path={data_path} is not a file")
    if options.iterations < 1:
        sys.exit(f"error: --iterations={options.iterations}: give at least 1")
    torch.set_default_dtype(torch.float64)

    with reference_workdir(data_path) as data_flag:
        data_flags = [data_flag]
        reference = import_reference(options.reference, [*data_flags, *SHARED_FLAGS])
        args = parse_args([*data_flags, *SHARED_FLAGS, *OUR_FLAGS])
        data = quietly(load_data, DataConfig.from_args(args))
        data_ok = compare_data(reference_learner(reference, data_flags), data)

        print(f"\n2. Models and meta-gradients: relative error, float64, dropout off, "
              f"{options.num_tasks} test tasks, every step's query loss")
        worst = 0.0
        for model_name in options.models:
            for method in options.methods:
                errors = compare_learners(reference, model_name, method, data_flags, options.num_tasks,
                                          options.iterations, options.flags)
                worst = max(worst, *errors.values())
                print(f"   {model_name:8s} {method:8s} " + " | ".join(f"{k} {v:.1e}" for k, v in errors.items()))

        print(f"\n3. Initialisation ({options.seeds} seeds): one gradient step at lr {args.inner_lr} on a "
              f"user's support set, mean |change| of the predictions in stars (reference | ours | ratio)")
        for model_name in options.models:
            moves, stds = initialisation(reference, model_name, data_flags, range(options.seeds))
            theirs, ours = np.mean(moves["reference"]), np.mean(moves["ours"])
            print(f"   {model_name:8s} {theirs:.2e} | {ours:.2e} | {ours / theirs:.2f}")
            print("     mean and std of each parameter tensor, averaged over the seeds (reference | ours):")
            for name, values in stds.items():
                mine, their = torch.stack([torch.stack(pair) for pair in values]).mean(dim=0)
                print(f"       {name:40s} {their[0]:+.3f} {their[1]:.4f} | {mine[0]:+.3f} {mine[1]:.4f}")

    ok = data_ok and worst <= options.tolerance and math.isfinite(worst)
    print(f"\nlargest relative error {worst:.1e} (tolerance {options.tolerance:g}); data "
          f"{'identical' if data_ok else 'DIFFERENT'}: {'parity' if ok else 'NO PARITY'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
