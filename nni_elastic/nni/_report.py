"""What NNI trials report: metric dicts of plain numbers, intermediate results, a ``metrics.json``.

NNI's built-in tuners and its web UI take a final result that is a number, or a dict whose
``"default"`` is a number; the web UI shows the other keys as columns of the trial table and
plots them, so every value here is a finite ``int`` or ``float``: lists are flattened to one
key per entry (``acc_level0``, ``acc_level1``, ...), booleans become 0/1 and missing values
(``None``, NaN) are left out.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["numeric_metric", "under_nni", "trial_output_dir", "report_final", "setup_logging", "trial_main"]

logger = logging.getLogger(__name__)


def under_nni() -> bool:
    """True inside an NNI experiment (the training service sets ``NNI_PLATFORM``)."""
    return bool(os.environ.get("NNI_PLATFORM"))


def trial_output_dir(out: Optional[str], default: str) -> Path:
    """NNI's trial output directory (``NNI_OUTPUT_DIR``) inside an experiment, else ``out`` or ``default``."""
    nni_out = os.environ.get("NNI_OUTPUT_DIR")
    if under_nni() and nni_out:
        if out is not None and Path(out).resolve() != Path(nni_out).resolve():
            logger.warning("--out %s ignored: inside NNI the trial writes to its output directory %s", out, nni_out)
        return Path(nni_out)
    return Path(out if out is not None else default)


def numeric_metric(values: Mapping[str, Any]) -> dict[str, float]:
    """A metric dict NNI accepts: ``"default"`` plus only finite numbers (bools as 0/1, ``None`` dropped).

    Raises ``ValueError`` when ``"default"`` is missing or not a finite number (NNI would reject it).
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[str(key)] = value
        elif value is not None and not (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"metric {key!r}: {value!r} is not a number; NNI metrics must be numbers "
                             f"(flatten lists into one key per entry)")
    if "default" not in out:
        raise ValueError(f"metric needs a finite number under 'default', got {values.get('default')!r}")
    return out


def report_final(metric: Mapping[str, float], details: Mapping[str, Any], out_dir: Path) -> dict[str, float]:
    """Report the final result to NNI (standalone: NNI logs it), write ``metrics.json``, print one line.

    Adds ``parameter_id``, the id of the parameters this trial received: NNI 3.0's local
    training service may hand trials started together each other's parameters while its web
    UI shows the submitted ones (NNI issue 5726), so this number (and ``metrics.json``) says
    which parameters really ran. Returns the reported dict.
    """
    import nni

    from ..checkpoint import atomic_write_json

    metric = dict(metric)
    record = getattr(nni.trial, "_params", None)  # the received parameter record (NNI 3.0, frozen)
    if isinstance(record, Mapping) and isinstance(record.get("parameter_id"), int):
        metric["parameter_id"] = record["parameter_id"]
    atomic_write_json({"metric": metric, **details}, out_dir / "metrics.json")
    nni.report_final_result(metric)
    print(f"final metric: {json.dumps(metric, sort_keys=True)}", flush=True)
    return metric


def setup_logging() -> None:
    """Trial entry points: INFO lines on stdout (``trial.stdout``), warnings and errors on stderr (``trial.stderr``)."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):  # an entry point owns the process's logging (like basicConfig(force=True))
        root.removeHandler(handler)
    for handler in (out, err):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("nni").propagate = False  # NNI prints its own lines (e.g. standalone "Final result")


def trial_main(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
               run_from_args: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nni_elastic.nni.<trial>``: parse the trial's options, set up trial logging, run it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run_from_args(args)
