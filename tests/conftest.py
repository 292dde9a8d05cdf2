import sys
from pathlib import Path

# Make helper modules in tests/ (e.g. datafiles.py) importable under any pytest import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
