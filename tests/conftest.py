"""What the tests share: the small rating file most of them read, and the mark of the tests
that compile with torch.compile (``-m compile``), which the default command leaves out: Inductor
compiles C++ kernels for them, minutes on two cores with a cold cache."""
import pytest

from fixtures import write_ratings


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: compiles with torch.compile (minutes on a cold Inductor cache); "
                                       "run with -m compile")


def pytest_report_header(config):
    if "compile" in (config.getoption("markexpr") or "").replace("not compile", ""):
        return ("the compile tests: Inductor compiles C++ kernels for each graph, about a minute each on two "
                "cores the first time (its cache, TORCHINDUCTOR_CACHE_DIR, keeps them for the next run)")
    return None


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """A MovieLens-1M-layout file of 60 users and 30 items (seeded)."""
    return write_ratings(tmp_path_factory.mktemp("data") / "ratings.dat", "ml-1m", num_users=60, num_items=30, seed=3)
