"""NNI trial entry for subnet search: evaluate per-stage widths of a trained elastic model (no training).

    python -m nni_elastic.nni.subnet_trial --checkpoint runs/prune_and_grow/digits/elastic.pt \
        [--max-macs 0.5] [--max-latency-ms 2] [--data digits] [--calibrate-batches 10] [--params JSON]

``nni.get_next_parameter()`` gives one width per stage (``search_spaces/subnet_search.json``:
``{"conv1": 0.5, "layer1": 0.75, ...}``, the stage rule of :func:`nni_elastic.subnet.stage_level`).
The trial activates that level on the checkpoint's shared weights, recomputes its BatchNorm
statistics on a few training batches (the same every trial: ``--seed``) and evaluates it on the
validation split the checkpoint was trained with, exactly as an Optuna subnet-search trial does
(:func:`nni_elastic.subnet.evaluate_subnet`). Seconds per trial, no retraining.

Budget: ``--max-macs`` (a fraction of the full network's MACs if <= 1, else MACs) and
``--max-latency-ms`` (the export's latency on this machine). A configuration over budget is
not evaluated; it reports ``feasible = 0``, ``accuracy = 0`` and ``default = -violation``
(``violation = max(macs / cap, latency / cap) - 1`` > 0), so every tuner ranks it below every
feasible configuration and nearer-to-budget ones above farther ones. Within budget
``default = accuracy``.

Reported (numbers only): ``default``, ``accuracy``, ``feasible``, ``violation``, ``macs``,
``macs_ratio``, ``params``, ``params_ratio`` and ``latency_ms`` (when measured: ``--latency`` or a
latency budget). The trial output directory gets ``metrics.json`` (also the channels per group)
and, for a feasible configuration, ``subnet.pt``/``subnet.ts``/``subnet.json`` (the compact
subnet with its recalibrated BatchNorm statistics).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..reporting import run_command
from ._report import numeric_metric, report_final, trial_output_dir, trial_main

__all__ = ["subnet_metric", "run_subnet_trial", "add_arguments", "run_from_args", "main"]

logger = logging.getLogger(__name__)

PROG = "python -m nni_elastic.nni.subnet_trial"


def subnet_metric(row: Mapping[str, Any]) -> dict[str, float]:
    """The NNI metric of an :func:`~nni_elastic.subnet.evaluate_subnet` row (numbers only, see the module docstring)."""
    violation = max(row["constraint"])
    metric: dict[str, Any] = {
        "default": row["accuracy"] if row["feasible"] else -violation,
        "accuracy": row["accuracy"], "feasible": bool(row["feasible"]), "violation": max(0.0, violation),
        "macs": row["macs"], "macs_ratio": row["macs_ratio"], "params": row["params"],
        "params_ratio": row["params_ratio"], "latency_ms": row["latency_ms"],
    }
    return numeric_metric(metric)


def _widths(params: Mapping[str, Any]) -> dict[str, float]:
    if not params:
        raise ValueError("no stage widths: run this inside an NNI experiment (search_spaces/subnet_search_digits.yml) "
                         "or pass --params '{\"conv1\": 0.5, \"layer1\": 0.5, \"layer2\": 1.0, \"layer3\": 1.0}'")
    out = {}
    for stage, w in params.items():
        if isinstance(w, str):  # a choice written as a string ("0.5") is read as the recipe keys are: YAML
            import yaml

            w = yaml.safe_load(w)
        out[stage] = w
    return out


def run_subnet_trial(checkpoint: str, *, params: Optional[Mapping[str, Any]] = None, max_macs: Optional[float] = None,
                     max_latency_ms: Optional[float] = None, data: Optional[str] = None, data_root: Optional[str] = None,
                     calibrate_batches: int = 10, val_limit: Optional[int] = None, seed: int = 0, device: str = "auto",
                     latency: bool = False, output: Optional[str] = None, export: bool = True) -> dict[str, float]:
    """Evaluate one per-stage configuration of ``checkpoint`` and report it to NNI; returns the metric.

    Args:
        checkpoint: an ``elastic.pt``.
        params: ``{stage: width}`` (default: ``nni.get_next_parameter()``).
        max_macs, max_latency_ms: budget (see the module docstring).
        data, data_root: dataset (default: the checkpoint's, split as in training).
        calibrate_batches, seed: BatchNorm recalibration batches and their order.
        val_limit: evaluate on the first ``val_limit`` validation samples only.
        device: ``auto``, ``cpu``, ``cuda``.
        latency: measure the export's latency even without a latency budget.
        output: output directory outside NNI (default ``runs/subnet_trial``).
        export: write the compact subnet of a feasible configuration.

    Example:
        >>> run_subnet_trial("runs/prune_and_grow/digits/elastic.pt", max_macs=0.5,
        ...                  params={"conv1": 0.5, "layer1": 0.5, "layer2": 1.0, "layer3": 1.0})
    """
    import nni

    from ..subnet import SubnetEvaluator, evaluate_subnet, export_subnet, latency_budget, macs_budget, stage_level

    received = nni.get_next_parameter()  # called in every case: NNI needs it before any report
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist; train one first, e.g. "
                                f"nni-elastic run strategies/prune_and_grow/digits.yaml (writes "
                                f"runs/prune_and_grow/digits/elastic.pt)")
    widths = _widths(dict(received or {}) if params is None else dict(params))
    latency_cap = latency_budget(max_latency_ms)
    ev = SubnetEvaluator.from_checkpoint(checkpoint, data=data, data_root=data_root, seed=seed,
                                         calibrate_batches=calibrate_batches, val_limit=val_limit, device=device,
                                         latency=latency or max_latency_ms is not None)
    full = ev.full_cost()
    row = evaluate_subnet(ev, widths, macs_cap=macs_budget(max_macs, full["macs"], "max_macs"), latency_cap=latency_cap,
                          full=full)
    out = trial_output_dir(output, "runs/subnet_trial")
    metric = subnet_metric(row)
    if row["feasible"] and export:
        ev.activate(stage_level(ev.em, widths))
        export_subnet(ev.em, row, out)
    return report_final(metric, {"checkpoint": checkpoint, "widths": widths, "channels": row["channels"],
                                 "max_macs": max_macs, "max_latency_ms": max_latency_ms, "full_macs": full["macs"],
                                 "full_params": full["params"], "trial": nni.get_trial_id()}, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subnet trial's options (shared by ``python -m`` and ``nni-elastic nni subnet-trial``)."""
    parser.add_argument("--checkpoint", required=True, help="a trained elastic checkpoint (elastic.pt)")
    parser.add_argument("--max-macs", type=float, default=None, help="budget: fraction of the full MACs if <= 1, else MACs")
    parser.add_argument("--max-latency-ms", type=float, default=None, help="budget: latency of the export on this machine")
    parser.add_argument("--latency", action="store_true", help="measure latency even without a latency budget")
    parser.add_argument("--data", default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--data-root", default=None, help="dataset directory (default: the checkpoint recipe's)")
    parser.add_argument("--calibrate-batches", type=int, default=10, help="training batches for BatchNorm recalibration")
    parser.add_argument("--val-limit", type=int, default=None, help="evaluate on this many validation samples only")
    parser.add_argument("--seed", type=int, default=0, help="order of the calibration batches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="output directory outside NNI (default runs/subnet_trial)")
    parser.add_argument("--params", default=None, metavar="JSON", help="stage widths instead of the tuner's, "
                                                                       "e.g. '{\"conv1\": 0.5, \"layer1\": 0.5}'")
    parser.add_argument("--no-export", action="store_true", help="do not write the compact subnet")


def run_from_args(args: argparse.Namespace, prog: str = PROG) -> int:
    """Run a subnet trial from parsed arguments; 0 on success, 2 on a named error (stderr)."""
    def trial() -> int:
        params = None
        if args.params is not None:
            params = json.loads(args.params)  # json.JSONDecodeError is a ValueError: one line too
            if not isinstance(params, dict):
                raise ValueError(f"--params {args.params!r}: expected a JSON object of {{stage: width}}")
        run_subnet_trial(args.checkpoint, params=params, max_macs=args.max_macs, max_latency_ms=args.max_latency_ms,
                         data=args.data, data_root=args.data_root, calibrate_batches=args.calibrate_batches,
                         val_limit=args.val_limit, seed=args.seed, device=args.device, latency=args.latency,
                         output=args.out, export=not args.no_export)
        return 0

    return run_command(prog, trial, with_type=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return trial_main(PROG, __doc__.splitlines()[0], add_arguments, run_from_args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
