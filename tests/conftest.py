"""Where the suite's references and data live: all of it inside the repository.

tests/fixtures: the independent reference checkpoints and outputs (tests/fixtures/README.md).
tests/data: the first lines of each real data file (tests/data/README.md). When $CLP_DATA names the whole
data (e.g. ../shared/data), the tests read that instead, and the few that need the whole files run too;
without it they skip, saying so (the `whole_data` mark).
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
EXCERPT = ROOT / "tests" / "data"
# an empty CLP_DATA counts as unset
WHOLE = Path(os.environ["CLP_DATA"]).resolve() if os.environ.get("CLP_DATA") else None
DATA = WHOLE or EXCERPT  # absolute: tests symlink into it
# the code under test finds the data the way a user's run would: through $CLP_DATA
os.environ["CLP_DATA"] = str(DATA)
TINY = ["tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"]
# the suite never downloads: a missing data directory means the fallback text, as on an offline machine
os.environ.setdefault("CLP_OFFLINE", "1")


def need(path):
    """Fail loudly (not skip) when a reference the suite depends on is missing."""
    if not Path(path).exists():
        pytest.fail(f"reference {path} is missing from the checkout (tests/fixtures, tests/data, or $CLP_DATA)")
    return Path(path)


def pytest_collection_modifyitems(config, items):
    """Tests marked whole_data read $CLP_DATA's whole files (as WHOLE); with only the excerpt they skip."""
    if WHOLE is None:
        skip = pytest.mark.skip(reason="needs the whole data: set CLP_DATA (e.g. CLP_DATA=../shared/data make test)")
        for item in items:
            if "whole_data" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=TINY)
def tiny_dir(request):
    return need(FIXTURES / request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default, fp32; converted into the cache on first use."""
    import load_weights

    return load_weights.load(load_weights.DEFAULT)


def pytest_configure(config):
    config.addinivalue_line("markers", "whole_data: reads the whole data files of $CLP_DATA (skipped without them)")
    """Scratch files in RAM (/dev/shm) when it has room: checkpoint writes fsync, and on a busy disk the
    waits would dominate the suite's time. Removed at the end of the session."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if config.option.basetemp is None and shm.is_dir() and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 4 * 2**30:
            config.option.basetemp = tempfile.mkdtemp(prefix="clp-pytest-", dir=shm)
            config.add_cleanup(lambda: shutil.rmtree(config.option.basetemp, ignore_errors=True))
