"""Paths to the independent references in ../shared and small shared fixtures."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("CLP_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = Path(os.environ.get("CLP_DATA", SHARED / "data"))
TINY = ["tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"]


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
