"""Paths to the independent references in ../shared and small shared fixtures."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("CLP_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
# an empty CLP_DATA counts as unset
DATA = Path(os.environ.get("CLP_DATA") or SHARED / "data").resolve()  # absolute: tests symlink into it
# the code under test finds the data the way a user's run would: through $CLP_DATA
os.environ["CLP_DATA"] = str(DATA)
TINY = ["tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"]
# the suite never downloads: a missing data directory means the fallback text, as on an offline machine
os.environ.setdefault("CLP_OFFLINE", "1")


def need(path):
    """Fail loudly (not skip) when a reference the suite depends on is missing."""
    if not Path(path).exists():
        pytest.fail(f"reference {path} is missing: run the tests from a checkout with ../shared beside it, "
                    f"or set CLP_SHARED / CLP_DATA")
    return Path(path)


@pytest.fixture(params=TINY)
def tiny_dir(request):
    return need(FIXTURES / request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default, fp32; converted into the cache on first use."""
    import load_weights

    return load_weights.load(load_weights.DEFAULT)


def pytest_configure(config):
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
