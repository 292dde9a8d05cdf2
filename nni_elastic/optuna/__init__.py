"""Optuna studies for nni-elastic: tune a recipe's thresholds, search subnets of a trained elastic model.

- :func:`tune` runs a recipe once per trial with the trial's recipe overrides, sampled from an
  NNI-format search space (``search_spaces/<method>_<recipe stem>.json``, shared with the NNI
  adapter). Single objective (accuracy, with intermediate values and a pruner) or several
  (accuracy vs MACs/params/latency: ``study.best_trials`` is the Pareto front). SQLite by default,
  any RDB URL or a journal file for many workers (``workers=N``), resumable, PNG plots, readable by
  ``optuna-dashboard <storage>``.
- :func:`search_subnets` searches per-stage widths of a trained ElasticModel on its shared
  weights (BatchNorm recalibrated, no training: seconds per trial) under a MACs/latency budget.

Optuna is imported when a name of this package is first used, so ``nni-elastic --help`` and
``nni_elastic.optuna.cli`` stay light.

Example:
    >>> from nni_elastic.optuna import tune, search_subnets
    >>> study = tune("strategies/prune_and_grow/digits.yaml", n_trials=20, storage="sqlite:///runs/pg.db",
    ...              study_name="pg-digits", objectives=("accuracy", "macs"))
    >>> result = search_subnets("runs/best/elastic.pt", data="digits", max_macs=0.5, n_trials=200)
    >>> result.front, result.best
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ._space import SearchSpaceError, check_params, find_search_space, load_search_space, suggest, to_distributions
    from ._storage import dashboard_command, fail_running_trials, open_storage
    from ._study import OBJECTIVES
    from ._subnet import SubnetSearchResult, model_stages, search_subnets, stage_groups, stage_level, subnet_constraints
    from ._tune import METRICS, summarize_levels, tune

_EXPORTS = {
    "tune": "._tune", "METRICS": "._tune", "summarize_levels": "._tune",
    "search_subnets": "._subnet", "SubnetSearchResult": "._subnet", "stage_groups": "._subnet",
    "stage_level": "._subnet", "model_stages": "._subnet", "subnet_constraints": "._subnet",
    "load_search_space": "._space", "to_distributions": "._space", "suggest": "._space", "check_params": "._space",
    "find_search_space": "._space", "SearchSpaceError": "._space",
    "open_storage": "._storage", "fail_running_trials": "._storage", "dashboard_command": "._storage",
    "OBJECTIVES": "._study",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
