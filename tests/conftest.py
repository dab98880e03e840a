"""What the tests share: the small rating files most of them read, and the mark of the tests
that compile with torch.compile (``-m compile``), which the default command leaves out: Inductor
compiles C++ kernels for them, minutes on two cores with a cold cache."""
import pytest

from config import DataConfig
from dataloader import load_data
from fixtures import make_args, make_ratings_frame, write_ratings
from tiny_study import make_study


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: compiles with torch.compile (minutes on a cold Inductor cache); "
                                       "run with -m compile")


def pytest_collection_finish(session):
    """A line, even under -q, before tests that compile: the minutes they take are not a hang."""
    compiling = sum(item.get_closest_marker("compile") is not None for item in session.items)
    if compiling:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"{compiling} tests compile with torch.compile: Inductor builds C++ kernels for each graph, about a "
            "minute each on two cores the first time (TORCHINDUCTOR_CACHE_DIR keeps them for the next run)")


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """A MovieLens-1M-layout file of 60 users and 30 items (seeded)."""
    return write_ratings(tmp_path_factory.mktemp("data") / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=3)


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """The tiny study (tiny_study.py), run once; test_report.py and test_reproduce.py read it."""
    return make_study(tmp_path_factory)


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    """Data of a MovieLens-1M-layout file of 60 users and 80 items (seeded), and its flags."""
    path = write_ratings(tmp_path_factory.mktemp("ml") / "ratings.dat", "ml-1m",
                         make_ratings_frame(num_users=60, num_items=80, seed=0))
    args = make_args(path)
    return load_data(DataConfig.from_args(args)), args
