"""benchmarks/device_check.py, which is run for real on a GPU, checked here on the CPU, and
the quick mode of benchmarks/meta_iteration.py."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import DataConfig, ModelConfig
from dataloader import load_data
from fixtures import write_ratings
from options import parse_args

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module(name):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device_check():
    return benchmark_module("device_check")


@pytest.fixture(scope="module")
def data(tmp_path_factory, device_check):
    path = write_ratings(tmp_path_factory.mktemp("data") / "ratings.dat", "ml-1m",
                         num_users=300, num_items=200, seed=0)
    return path, load_data(DataConfig.from_args(parse_args([f"--data_path={path}", *device_check.SMALL])))


def test_device_check_passes_on_the_cpu(device_check, data, capsys):
    path, ratings = data
    assert device_check.check("narm", "melo", ratings, path, "cpu") == []
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("narm")]
    assert len(rows) == 5 and all(row.endswith(" ok") for row in rows)  # float64/32 x vmap/loop, replay


@pytest.mark.compile
def test_device_check_compares_the_compiled_meta_gradient_with_the_eager_one(device_check, data, monkeypatch,
                                                                              capsys):
    path, ratings = data
    # one compilation of one inner step keeps it near a minute: CUDA graphs' mode, which the
    # CPU runs without them
    monkeypatch.setattr(device_check, "SMALL", [*device_check.SMALL, "--num_inner_steps=1"])
    monkeypatch.setattr(device_check, "COMPILE_MODES", ("reduce-overhead",))
    monkeypatch.setattr(device_check, "COMPILE_DTYPES", (device_check.torch.float64,))
    assert device_check.check("ncf", "maml", ratings, path, "cpu", compiled=True) == []
    line = next(line for line in capsys.readouterr().out.splitlines() if "compiled, reduce-overhead" in line)
    assert line.startswith("ncf       maml  float64  compiled") and line.endswith("ok")
    assert float(line.split("gradient")[1].split()[0]) < 1e-12


def test_device_check_reports_an_error_over_its_tolerance(device_check, data, monkeypatch):
    path, ratings = data
    monkeypatch.setitem(device_check.TOLERANCE, device_check.torch.float32, 1e-12)
    failures = device_check.check("narm", "maml", ratings, path, "cpu")
    assert failures == ["torch.float32 vmap", "torch.float32 loop"]


def test_meta_iteration_quick_prints_a_row_per_configuration(tmp_path):
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", num_users=943, num_items=600, seed=0)
    started = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "meta_iteration.py"), "--quick",
                          "--models", "ncf", "--methods", "maml", "melo", f"--data_path={path}"],
                         capture_output=True, text=True, check=True)
    wall_seconds = time.perf_counter() - started
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("ncf")]
    assert [row[:3] for row in rows] == [["ncf", "maml", "vmap"], ["ncf", "maml", "loop"],
                                          ["ncf", "melo", "vmap"], ["ncf", "melo", "loop"]]
    # --quick: 2 timed iterations each, all of them within the benchmark's own run time
    assert 0 < sum(2 * float(row[3]) for row in rows) < wall_seconds
    for model, method, path_name, seconds, tasks_per_second, peak_mib, evaluation, first_step, graphs in rows:
        assert float(tasks_per_second) > 0 and float(peak_mib) > 100 and float(first_step) >= 0
        assert graphs == "-"   # compiled graphs: only --paths compiled counts them
        assert (evaluation == "-") == (path_name == "loop")
        if path_name == "vmap":
            assert float(evaluation) > 0


# --- benchmarks/reference_parity.py (the reference itself is not in CI) -------------------
@pytest.fixture(scope="module")
def reference_parity():
    return benchmark_module("reference_parity")


def test_parity_refuses_a_folder_that_is_not_the_reference(reference_parity, tmp_path):
    with pytest.raises(SystemExit, match="not a checkout of the reference"):
        reference_parity.import_reference(tmp_path, [])


def test_the_reference_is_imported_with_its_argv_and_ours_keep_their_names(reference_parity, tmp_path):
    """A stand-in with the reference's module names: its options parse the argv the harness
    sets, its main sees its own options, and afterwards `options` and `models` are ours."""
    import models
    import options
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("WHO = 'reference'\n")
    (tmp_path / "models" / "meta_bert_model.py").write_text("")
    (tmp_path / "options.py").write_text("import sys\nargs = sys.argv[1:]\n")
    (tmp_path / "train_original.py").write_text("WHO = 'reference Basic'\n")
    (tmp_path / "main.py").write_text("import wandb, wget\nfrom options import args\nimport models\n"
                                      "WHO = models.WHO\n")
    reference = reference_parity.import_reference(tmp_path, ["--model=gru4rec"])
    assert reference.args == ["--model=gru4rec"] and reference.main.WHO == "reference"
    assert reference.models.WHO == "reference"
    assert reference.train_original.WHO == "reference Basic"
    assert sys.modules["options"] is options and sys.modules["models"] is models
    assert str(tmp_path) not in sys.path


def test_reference_names_map_onto_every_parameter(reference_parity):
    """The name map of the GRU models: the reference's names (as its modules spell them)
    land on all of ours, with the stacked initial states and the extra vocabulary row."""
    import torch
    from models import model_factory
    args = parse_args(["--model=narm"])
    ours = dict(model_factory(ModelConfig.from_args(args, num_items=10)).named_parameters())
    hidden = args.narm_hidden_size
    reference = {"embedding.embedding.weights": torch.zeros(12, 32), "gru.h0": torch.ones(1, hidden),
                 "gru.layer_dict.gru0.x2h.weights": torch.zeros(3 * hidden, 32),
                 "gru.layer_dict.gru0.x2h.bias": torch.zeros(3 * hidden),
                 "gru.layer_dict.gru0.h2h.weights": torch.zeros(3 * hidden, hidden),
                 "gru.layer_dict.gru0.h2h.bias": torch.zeros(3 * hidden),
                 "gru.layer_dict.fc.weights": torch.zeros(hidden, hidden), "gru.layer_dict.fc.bias": torch.zeros(hidden),
                 "a_1.weights": torch.zeros(hidden, hidden), "a_2.weights": torch.zeros(hidden, hidden),
                 "v_t.weights": torch.zeros(1, hidden), "out_layer.weights": torch.zeros(1, hidden),
                 "out_layer.bias": torch.zeros(1)}
    mapped = reference_parity.mapped(reference, reference_parity.NAMES["narm"], ours, fill=lambda p: p)
    assert mapped.keys() == ours.keys()
    assert all(mapped[name].shape == p.shape for name, p in ours.items())
    assert torch.equal(mapped["gru.initial_states"], torch.ones(1, hidden))
    with pytest.raises(KeyError, match="no reference tensor maps to"):
        reference_parity.mapped({k: v for k, v in reference.items() if k != "gru.h0"},
                                reference_parity.NAMES["narm"], ours, fill=lambda p: p)


def test_reference_study_seeds_the_references_clock_reseeds():
    study = benchmark_module("reference_study")
    import numpy as np
    with study.clock_reseeds_seeded(5):
        np.random.seed()  # what the reference does before its train/valid split
        drawn = np.random.rand(3)
        np.random.seed(7)  # an explicit seed stays what it is
        explicit = np.random.rand(3)
    np.random.seed(5)
    np.testing.assert_array_equal(drawn, np.random.rand(3))
    np.random.seed(7)
    np.testing.assert_array_equal(explicit, np.random.rand(3))
    np.random.seed()
    assert not np.array_equal(np.random.rand(3), drawn), "outside the block the clock is back"


@pytest.mark.parametrize("model_name", ["bert4rec", "gru4rec"])
def test_the_references_basic_embedding_is_renamed_into_ours(model_name):
    """Its embedding state (module-relative names, one vocabulary row more) becomes our
    model's embedding state: every tensor, in our shapes, the same rows."""
    import torch
    from models import model_factory
    tool = benchmark_module("reference_embedding")
    args = parse_args([f"--model={model_name}"])
    ours = model_factory(ModelConfig.from_args(args, num_items=10)).embedding.state_dict()
    width = ours["items.weight"].shape[1]
    items = torch.arange(12 * width, dtype=torch.float).reshape(12, width)
    reference = {"embedding.weights": items}
    if model_name == "bert4rec":
        reference["position.weights"] = torch.ones(args.max_seq_len, width)
    renamed = tool.in_our_layout(reference, model_name, ours)
    assert renamed.keys() == ours.keys()
    assert torch.equal(renamed["items.weight"], items[:11])                # padding row 0 and items 1..10
    if model_name == "bert4rec":
        assert torch.equal(renamed["positions.weight"], torch.ones(args.max_seq_len, width))
        with pytest.raises(KeyError, match="no reference tensor maps to"):
            tool.in_our_layout({"embedding.weights": items}, model_name, ours)


def test_support_padding_fractions_fall_with_more_chunks_and_stay_above_the_real_ones(tmp_path):
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", num_users=300, num_items=200, seed=0)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "support_padding.py"), f"--data_path={path}",
                          "--batches=5", "--min_item=1", "--num_test_data=20", "--val_size=8"],
                         capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    real = float(next(line for line in lines if line.startswith("real positions:")).split()[-1])
    chunked = [float(line.split()[-1]) for line in lines if "support chunk(s):" in line]
    assert len(chunked) == 5 and 0 < real <= chunked[-1]
    assert all(more <= fewer for fewer, more in zip(chunked, chunked[1:])) and chunked[0] <= 1
    assert "3 chunks, lengths rounded up to multiples of 10" in lines[-1] and lines[-1].endswith("%")
