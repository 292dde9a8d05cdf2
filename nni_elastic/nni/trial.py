"""NNI trial entry: one recipe run per trial, with the tuner's parameters as recipe overrides.

    python -m nni_elastic.nni.trial --recipe strategies/prune_and_grow/digits.yaml [--set k=v ...] \
        [--level largest|smallest|mean|<index>] [--out DIR] [--params JSON] [--no-exports] [--quiet]

1. ``nni.get_next_parameter()`` gives ``{dotted recipe key: value}`` sampled from a
   ``search_spaces/*.json`` space. Values are read exactly as the Optuna adapter reads them
   (:func:`nni_elastic.config.apply_overrides`): a string is parsed as YAML, so a list-valued key
   written as a choice string (``"[0.25, 0.5, 1.0]"``) becomes a list. ``--set key=value`` pins a
   key for every trial (budget keys such as ``data.limit``); a key both pinned and tuned keeps the
   pinned value, as an override pins a key in ``nni-elastic tune``, and the trial log says so.
2. The recipe runs (:func:`nni_elastic.runner.run_recipe`) with its output in NNI's trial output
   directory (``NNI_OUTPUT_DIR``; outside NNI ``--out``, default ``runs/trial``): ``elastic.pt``,
   ``exports/``, ``levels.json``, the plot, and ``metrics.json`` (what was reported).
3. After every strategy step, ``nni.report_intermediate_result(val_accuracy)``.
4. At the end, ``nni.report_final_result(metric)`` with the numbers of :func:`final_metric`:
   ``default`` (accuracy of the ``--level``), MACs, params, latency, and per level
   ``acc_level{i}``, ``macs_level{i}``, ...

Outside NNI (no experiment) NNI's standalone mode hands out no parameters (``--params`` gives
some, e.g. to rerun a trial from the web UI) and logs the metrics; the trial also prints
``final metric: {...}``. A failing trial exits non-zero with one line naming the error on stderr
(recipe errors name the key: ``strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']``),
which NNI keeps as the trial's ``trial.stderr``; the experiment goes on with other trials.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Union

from ..config import load_recipe, parse_overrides
from ..reporting import run_command, summarize_levels
from ..strategies import get_strategy
from ._report import numeric_metric, report_final, trial_main, trial_output_dir, under_nni

__all__ = ["LEVELS", "final_metric", "parse_level", "run_trial", "add_arguments", "run_from_args", "main"]

logger = logging.getLogger(__name__)

PROG = "python -m nni_elastic.nni.trial"
LEVELS = ("largest", "smallest", "mean")


def parse_level(text: Union[str, int]) -> Union[str, int]:
    """``largest``, ``smallest``, ``mean`` or a level index (negative counts from the largest)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if text in LEVELS:
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"--level {text!r}: use one of {list(LEVELS)} or a level index (0 = smallest)") from None


def final_metric(rows: Sequence[Mapping[str, Any]], level: Union[str, int] = "largest",
                 compute: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The final NNI metric of a run from its level rows (:attr:`RunResult.rows`), numbers only.

    ``default`` and ``accuracy`` are the validation accuracy of ``level`` (``largest``,
    ``smallest``, ``mean`` over the levels, or an index); ``macs``, ``params``, ``latency_ms`` and
    ``macs_ratio``/``params_ratio`` (relative to the largest level) are those of the same level(s);
    ``mean_accuracy`` averages every level; per level ``acc_level{i}``, ``macs_level{i}``,
    ``params_level{i}``, ``latency_ms_level{i}``, ``width_level{i}`` (prune-and-grow); ``levels`` is
    their number and ``full_epochs`` the training compute in full-model epochs, when known.

    Example:
        >>> final_metric(result.rows, "largest")["default"]
    """
    chosen, every = summarize_levels(rows, level), summarize_levels(rows, "mean")
    metric: dict[str, Any] = {"default": chosen["accuracy"], **chosen, "mean_accuracy": every["accuracy"],
                              "levels": len(rows)}
    for i, r in enumerate(rows):
        for key, name in (("accuracy", "acc"), ("macs", "macs"), ("params", "params"), ("latency_ms", "latency_ms"),
                          ("width", "width")):
            metric[f"{name}_level{i}"] = r.get(key)
    if compute and compute.get("full_epochs") is not None:
        metric["full_epochs"] = compute["full_epochs"]
    return numeric_metric(metric)


def _merge(params: Mapping[str, Any], pinned: Mapping[str, Any]) -> dict[str, Any]:
    """The tuner's parameters with the ``--set`` keys pinned (the pinned value wins, as in ``nni-elastic tune``)."""
    for key in sorted(set(params) & set(pinned)):
        logger.warning("%s: pinned by --set to %r; the tuner's value %r is not used", key, pinned[key], params[key])
    return {**dict(params), **dict(pinned)}


def run_trial(recipe: str, *, params: Optional[Mapping[str, Any]] = None, overrides: Optional[Mapping[str, Any]] = None,
              level: Union[str, int] = "largest", output: Optional[str] = None, quiet: bool = False,
              exports: bool = True) -> dict[str, float]:
    """Run one trial: load the recipe with ``params`` and ``overrides``, run it, report to NNI; returns the final metric.

    Args:
        recipe: a recipe YAML path.
        params: the tuner's parameters ``{dotted key: value}`` (default: ``nni.get_next_parameter()``).
        overrides: pinned recipe keys (``--set``); they win over ``params``.
        level: which level's accuracy is ``default`` (see :func:`final_metric`).
        output: output directory outside NNI (inside NNI: the trial output directory).
        quiet: no progress bars (always quiet inside NNI, whose trial logs are files).
        exports: write compact exports of every level.

    Example:
        >>> run_trial("strategies/prune_and_grow/digits.yaml", params={"strategy.grow_epochs": 1},
        ...           overrides={"data.limit": 200}, output="runs/trial")
    """
    import nni

    from .. import distributed as dist

    level = parse_level(level)
    # a trial may itself be a torchrun job (trialCommand: torchrun --nproc_per_node N -m nni_elastic.nni.trial ...):
    # rank 0 takes the parameters and reports; every rank trains
    main = int(os.environ.get("RANK", "0")) == 0
    received = nni.get_next_parameter() if main else None  # called in every case: NNI needs it before any report
    started = dist.setup_from_env(load_recipe(recipe, dict(overrides or {})).device)
    try:
        received = dist.from_main(received)
        result = _run(recipe, received, params, overrides, level, output, quiet, exports, main)
        # rank 0 writes and reports; the trial ends when it has. Not on an error: a rank that raised
        # must leave, so that torchrun stops the others, rather than wait for them here.
        dist.barrier()
        return result
    finally:
        if started:
            dist.teardown()


def _run(recipe: str, received: Any, params: Optional[Mapping[str, Any]], overrides: Optional[Mapping[str, Any]],
         level: Union[str, int], output: Optional[str], quiet: bool, exports: bool, main: bool) -> dict[str, float]:
    import nni

    params = dict(received or {}) if params is None else dict(params)
    merged = _merge(params, overrides or {})
    loaded = load_recipe(recipe, merged)
    n_levels = get_strategy(loaded.method).num_levels(loaded.strategy, loaded.elastic)  # None: known after the run
    if isinstance(level, int) and n_levels is not None and not -n_levels <= level < n_levels:
        raise ValueError(f"--level {level}: the recipe has {n_levels} levels "
                         f"(elastic.widths {loaded.elastic.widths})")
    out = trial_output_dir(output, "runs/trial")
    logger.info("trial %s: recipe %s, parameters %s, output %s", nni.get_trial_id(), recipe, params, out)

    def on_step_end(info: Any) -> None:
        if info.val_accuracy is not None and main:
            nni.report_intermediate_result(float(info.val_accuracy))

    from ..runner import run_recipe  # the training stack loads only when a trial runs

    result = run_recipe(loaded, output=out, quiet=quiet or under_nni() or not main, exports=exports,
                        on_step_end=on_step_end)
    metric = final_metric(result.rows, level, result.compute)
    if not main:
        return metric
    return report_final(metric, {"recipe": recipe, "parameters": params, "overrides": merged, "level": level,
                                 "trial": nni.get_trial_id(), "experiment": nni.get_experiment_id()}, out)


def _params(text: Optional[str]) -> Optional[dict[str, Any]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params {text!r}: not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--params {text!r}: expected a JSON object of {{dotted key: value}}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trial's options (shared by ``python -m nni_elastic.nni.trial`` and ``nni-elastic nni trial``)."""
    parser.add_argument("--recipe", required=True, help="a recipe YAML, e.g. strategies/prune_and_grow/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pin a recipe key for every trial, e.g. data.limit=600 (wins over the tuner's value)")
    parser.add_argument("--level", default="largest", type=parse_level,
                        help="level whose accuracy is the 'default' metric: largest (default), smallest, mean, or an index")
    parser.add_argument("--out", default=None, help="output directory outside NNI (default runs/trial)")
    parser.add_argument("--params", default=None, metavar="JSON",
                        help="parameters to use instead of the tuner's, e.g. to rerun a trial: "
                             "'{\"strategy.grow_epochs\": 2}'")
    parser.add_argument("--no-exports", action="store_true", help="do not write compact exports of every level")
    if "--quiet" not in parser._option_string_actions:  # nni-elastic's common options may have it already
        parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_from_args(args: argparse.Namespace, prog: str = PROG) -> int:
    """Run a trial from parsed arguments; 0 on success, 2 on a recipe or argument error (named on stderr)."""
    def trial() -> int:
        run_trial(args.recipe, params=_params(args.params), overrides=parse_overrides(args.set), level=args.level,
                  output=args.out, quiet=args.quiet, exports=not args.no_exports)
        return 0

    return run_command(prog, trial, with_type=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return trial_main(PROG, __doc__.splitlines()[0], add_arguments, run_from_args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
