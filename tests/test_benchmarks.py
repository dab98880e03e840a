"""benchmarks/device_check.py, which is run for real on a GPU, checked here on the CPU, and
the quick mode of benchmarks/meta_iteration.py."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dataloader import load_data
from fixtures import write_ratings
from options import parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory, device_check):
    path = write_ratings(tmp_path_factory.mktemp("data") / "ratings.dat", "ml-1m",
                         num_users=300, num_items=200, seed=0)
    return path, load_data(parse_args([f"--data_path={path}", *device_check.SMALL]))


def test_device_check_passes_on_the_cpu(device_check, data, capsys):
    path, ratings = data
    assert device_check.check("narm", "melo", ratings, path, "cpu") == []
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("narm")]
    assert len(rows) == 5 and all(row.endswith(" ok") for row in rows)  # float64/32 x vmap/loop, replay


def test_device_check_reports_an_error_over_its_tolerance(device_check, data, monkeypatch):
    path, ratings = data
    monkeypatch.setitem(device_check.TOLERANCE, device_check.torch.float32, 1e-12)
    failures = device_check.check("narm", "maml", ratings, path, "cpu")
    assert failures == ["torch.float32 vmap", "torch.float32 loop"]


def test_meta_iteration_quick_prints_a_row_per_configuration(tmp_path):
    path = write_ratings(tmp_path / "ratings.dat", "ml-1m", num_users=943, num_items=600, seed=0)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "meta_iteration.py"), "--quick",
                          "--models", "ncf", "--methods", "maml", "melo", f"--data_path={path}"],
                         capture_output=True, text=True, check=True)
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("ncf")]
    assert [row[:3] for row in rows] == [["ncf", "maml", "vmap"], ["ncf", "maml", "loop"],
                                          ["ncf", "melo", "vmap"], ["ncf", "melo", "loop"]]
    for model, method, path_name, seconds, tasks_per_second, peak_mib, evaluation in rows:
        assert float(seconds) > 0 and float(peak_mib) > 100
        assert float(tasks_per_second) == pytest.approx(4 / float(seconds), rel=0.05)  # --quick: 4 tasks
        assert (evaluation == "-") == (path_name == "loop")
