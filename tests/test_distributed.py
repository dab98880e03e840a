"""main.py and train_original.py under several processes (torch.distributed, gloo, loopback):
the outer step, a Basic epoch and the test metrics equal one process's, the ranks stay in
step and draw their own dropout masks, a checkpoint of 2 processes resumes in 1, and a rank
that dies stops the others with a clear message."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from config import BasicRunConfig, DataConfig, MetaRunConfig
from dataloader import load_data
from fixtures import run_dir
import main
from options import parse_args
from run import distributed
from run.atomic_files import load_checked
from run.run_files import checkpoint_steps
import train_original

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--mode=ml-1m", "--min_item=1", "--num_test_data=10", "--val_size=5", "--max_seq_len=8",
        "--num_samples=4", "--num_query_set=2", "--bert_hidden_units=8", "--bert_num_blocks=1",
        "--bert_num_heads=2", "--lstm_hidden=8", "--lstm_input_size=4", "--bert_dropout=0", "--inner_lr=0.1"]
METHODS = {"maml": ["--use_adaptive_loss=False"], "melo": []}
BASIC = {"basic": [], "learned loss": ["--use_learned_loss_baseline=True"]}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(rank, world_size, port):
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def outer_steps(ratings_file, log_dir):
    """For MAML and MELO, in float64: the meta-gradients and parameters after one outer step on
    16 tasks and on 15, the parameters after two more steps on sampled batches, and the test
    metrics; in this process, joined to a process group if one is set up."""
    results = {}
    for method, flags in METHODS.items():
        args = parse_args([f"--data_path={ratings_file}", *TINY, f"--log_dir={log_dir}", *flags])
        data = load_data(DataConfig.from_args(args))
        for num_tasks in (16, 15):
            torch.manual_seed(0)  # the encoder's initialisation
            trainer = main.MetaTrainer(MetaRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
            trainer.learner.double()
            batch = trainer.sampler.train_batch(num_tasks)
            batch.support_ratings, batch.query_ratings = batch.support_ratings.double(), batch.query_ratings.double()
            metrics = trainer.train_step(batch)
            results[method, num_tasks] = {
                "rmse": metrics["rmse"],
                "gradients": {n: p.grad.clone() for n, p in trainer.learner.named_parameters() if p.grad is not None},
                "parameters": {n: p.detach().clone() for n, p in trainer.learner.named_parameters()}}
        for _ in range(2):
            trainer.train_step(trainer.sampler.train_batch(4))
        results[method, "trained"] = torch.cat([p.detach().flatten() for p in trainer.learner.parameters()])
        results[method, "test"] = trainer.evaluate(trainer.sampler.fixed_tasks("test"))
    return results


def basic_epochs(ratings_file, log_dir):
    """For Basic and its learned-loss variant, in float64: the parameters and train metrics
    after one epoch in batches of 16 users (uneven shares), and the test metrics."""
    results = {}
    for name, flags in BASIC.items():
        args = parse_args([f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={log_dir}",
                           "--pretraining_batch_size=16", *flags])
        torch.manual_seed(0)
        data = load_data(DataConfig.from_args(args))
        trainer = train_original.BasicTrainer(BasicRunConfig.from_args(args, data.num_items), data, torch.device("cpu"))
        trainer.model.double()
        if trainer.encoder is not None:
            trainer.encoder.double()
        initial = torch.cat([p.detach().flatten() for p in trainer.parameters()])
        metrics = trainer.train_epoch(epoch=1)
        results[name] = {"train": metrics, "initial": initial, "test": trainer.evaluate(trainer.sampler.fixed_tasks("test")),
                         "parameters": torch.cat([p.detach().flatten() for p in trainer.parameters()])}
    return results


def dropout_masks():
    """After own_dropout_stream, the mask of a dropout layer, and the generator state that
    rank 0 must keep."""
    torch.manual_seed(5)
    state = torch.get_rng_state()
    distributed.own_dropout_stream()
    kept = torch.equal(torch.get_rng_state(), state)
    return {"dropout mask": torch.nn.functional.dropout(torch.ones(64), 0.5) > 0, "state kept": kept}


def rank_main(rank, world_size, port, ratings_file, log_dir, out):
    os.environ.update(rank_environment(rank, world_size, port))
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    try:
        torch.save({**outer_steps(ratings_file, log_dir), **basic_epochs(ratings_file, log_dir), **dropout_masks()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def two_ranks(ratings_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(2, free_port(), str(ratings_file), str(out / "log"), str(out)), nprocs=2)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def one_process(ratings_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("one") / "log"
    return {**outer_steps(ratings_file, log_dir), **basic_epochs(ratings_file, log_dir)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_tasks", [16, 15])  # 8 + 8 and 8 + 7 tasks
def test_two_ranks_take_the_outer_step_of_one_process(two_ranks, one_process, method, num_tasks):
    expected = one_process[method, num_tasks]
    for rank in two_ranks:
        got = rank[method, num_tasks]
        assert got["gradients"].keys() == expected["gradients"].keys() and len(expected["gradients"]) > 5
        for name, gradient in expected["gradients"].items():
            torch.testing.assert_close(got["gradients"][name], gradient, rtol=1e-9, atol=1e-9, msg=name)
        for name, parameter in expected["parameters"].items():
            torch.testing.assert_close(got["parameters"][name], parameter, rtol=1e-9, atol=1e-9, msg=name)
        assert got["rmse"] == pytest.approx(expected["rmse"], rel=1e-9)  # every rank's predictions gathered


@pytest.mark.parametrize("method", METHODS)
def test_the_ranks_stay_in_step_and_test_as_one_process(two_ranks, one_process, method):
    assert torch.equal(two_ranks[0][method, "trained"], two_ranks[1][method, "trained"])
    expected = one_process[method, "test"]
    for rank in two_ranks:
        metrics = rank[method, "test"]
        assert metrics["num_users"] == expected["num_users"] == 10
        assert metrics["per_user"]["user"] == expected["per_user"]["user"]
        assert metrics["rmse"] == pytest.approx(expected["rmse"], rel=1e-9)
        assert metrics["mae"] == pytest.approx(expected["mae"], rel=1e-9)


@pytest.mark.parametrize("variant", BASIC)
def test_two_ranks_train_a_basic_epoch_as_one_process(two_ranks, one_process, variant):
    expected = one_process[variant]
    for rank in two_ranks:
        got = rank[variant]
        torch.testing.assert_close(got["parameters"], expected["parameters"], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(got["parameters"], got["initial"], rtol=1e-3, atol=1e-3)  # the epoch trained
        for split in ("train", "test"):
            for metric in ("rmse", "mae"):
                assert got[split][metric] == pytest.approx(expected[split][metric], rel=1e-9), (split, metric)
        assert got["test"]["per_user"]["user"] == expected["test"]["per_user"]["user"]


def test_each_rank_draws_its_own_dropout_masks(two_ranks):
    assert two_ranks[0]["state kept"] and not two_ranks[1]["state kept"]
    assert not torch.equal(two_ranks[0]["dropout mask"], two_ranks[1]["dropout mask"])


def start_ranks(command, world_size, **popen):
    port = free_port()
    # MELO_PROGRESS=bars: the line per iteration that the tests wait for, into a pipe
    return [subprocess.Popen(command, env={**os.environ, **rank_environment(rank, world_size, port),
                                           "MELO_PROGRESS": "bars"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            for rank in range(world_size)]


def test_a_checkpoint_of_two_processes_resumes_in_one(ratings_file, tmp_path):
    flags = [f"--data_path={ratings_file}", *TINY, f"--log_dir={tmp_path}", "--batch_size=4",
             "--log_interval=2", "--num_train_iterations=4"]
    ranks = start_ranks([sys.executable, str(ROOT / "main.py"), *flags], 2)
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "Iteration 2:" in outputs[0][0] and outputs[1][0] == ""   # rank 0 alone prints
    two_processes = run_dir(tmp_path)
    resumed = main.main([*flags, "--checkpoint_step=2"])   # the same run, from its step 2, in one process
    assert resumed.iteration == 4 and resumed.files.folder == two_processes
    assert (two_processes / "state" / "bert4rec_4_ml-1m_melo.pt").is_file()


def test_basic_trains_in_two_processes_and_tests_in_one(ratings_file, tmp_path):
    flags = [f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path}", "--pretrain_epochs=2",
             "--save_pretrained=True"]
    ranks = start_ranks([sys.executable, str(ROOT / "train_original.py"), *flags], 2)
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "Epoch 2:" in outputs[0][0] and outputs[1][0] == ""   # rank 0 alone prints
    assert len(list(run_dir(tmp_path).glob("embedding/bert4rec_embedding_*"))) == 1
    step = checkpoint_steps(run_dir(tmp_path) / "state", "bert4rec_{step}_no_meta_best")[-1]
    metrics = train_original.main([*flags, "--test", f"--checkpoint_step={step}"])
    assert metrics["num_users"] == 10


def test_a_rank_that_dies_stops_the_others_with_a_message(ratings_file, tmp_path):
    flags = [f"--data_path={ratings_file}", *TINY, f"--log_dir={tmp_path}", "--batch_size=4",
             "--num_train_iterations=100000"]
    ranks = start_ranks([sys.executable, str(ROOT / "main.py"), *flags], 2)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("*/runs/*/events.*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # rank 0 is training
    ranks[1].send_signal(signal.SIGKILL)
    _, errors = ranks[0].communicate(timeout=60)
    ranks[1].wait()
    assert ranks[0].returncode == 1
    assert "another process of this torchrun job failed or stopped answering" in errors
    assert "Traceback" not in errors


def test_two_processes_stopped_by_sigterm_resume_exactly(ratings_file, tmp_path):
    """Both processes stop after the same iteration, process 0 writes the checkpoint with each
    process's dropout stream, and the two resumed processes end where two unstopped ones do."""
    flags = [f"--data_path={ratings_file}", *TINY, "--batch_size=4", "--log_interval=4", "--num_train_iterations=6",
             "--bert_dropout=0.3"]
    command = [sys.executable, "-u", str(ROOT / "main.py"), *flags]
    whole = start_ranks([*command, f"--log_dir={tmp_path / 'whole'}"], 2)
    assert [rank.communicate(timeout=120) and rank.returncode for rank in whole] == [0, 0]
    cut = start_ranks([*command, f"--log_dir={tmp_path / 'cut'}"], 2)
    for line in cut[0].stdout:
        if line.startswith("Iteration 2:"):
            for rank in cut:
                rank.send_signal(signal.SIGTERM)
            break
    outputs = [rank.communicate(timeout=120) for rank in cut]
    assert [rank.returncode for rank in cut] == [75, 75], outputs
    steps = checkpoint_steps(run_dir(tmp_path / "cut") / "state", "bert4rec_{step}_ml-1m_melo.pt")
    resumed = start_ranks([*command, f"--log_dir={tmp_path / 'cut'}", f"--checkpoint_step={steps[-1]}"], 2)
    assert [rank.communicate(timeout=120) and rank.returncode for rank in resumed] == [0, 0]
    ends = [load_checked(run_dir(tmp_path / root) / "state" / "bert4rec_6_ml-1m_melo.pt", weights_only=False)["learner"]
            for root in ("whole", "cut")]
    assert all(torch.equal(ends[0][name], ends[1][name]) for name in ends[0])
