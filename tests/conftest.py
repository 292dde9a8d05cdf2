import sys
from pathlib import Path

import pytest
import torch

# Make helper modules in tests/ (e.g. datafiles.py) importable under any pytest import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models with two OpenMP threads on a shared 2-core machine run far slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
