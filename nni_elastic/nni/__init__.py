"""NNI adapter: compression ``Pruner``, experiment trials, an Optuna-backed tuner.

- ``PruneAndGrowPruner`` (an NNI 3.0 compression ``Pruner``) and ``speedup_with_masks``.
- Trials for ``nnictl create`` experiments (``search_spaces/*.yml``):
  ``python -m nni_elastic.nni.trial`` runs a recipe with the tuner's parameters as overrides
  (:func:`run_trial`, :func:`final_metric`); ``python -m nni_elastic.nni.subnet_trial`` evaluates
  per-stage widths of a trained elastic model on its shared weights (:func:`run_subnet_trial`).
- ``OptunaTuner``: an NNI tuner that asks an Optuna study (any sampler, one or several
  objectives, stored so that ``optuna-dashboard`` reads it); :func:`register_tuner` registers it
  with NNI (``nnictl algo register``) under the name ``OptunaTuner``.
- NNI NAS (:mod:`nni_elastic.nni.nas`, extra ``.[nas]``): ``ElasticSpace`` + ``ElasticEvaluator``
  (subnet widths as an NNI model space on shared weights) and ``ExpansionGrowthStrategy`` +
  ``GrowableSpace`` + ``GrowthEvaluator`` (expansion-score growth as an NNI search strategy).

This is the only package that imports NNI (``import nni_elastic`` never does). Every name below
is imported on first use, so each entry point loads only what it needs.

Example:
    >>> from nni_elastic.nni import PruneAndGrowPruner, speedup_with_masks
    >>> pruner = PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
    ...                             train_data=splits.train, val_data=splits.val)
    >>> model, masks = pruner.compress(); pruner.unwrap_model()
    >>> compact = speedup_with_masks(model, masks, splits.example_inputs())
    >>> from nni_elastic.nni import register_tuner; register_tuner()   # then tuner: {name: OptunaTuner}
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PruneAndGrowPruner", "speedup_with_masks",
    "OptunaTuner", "register_tuner", "unregister_tuner", "write_tuner_meta", "TUNER_META",
    "run_trial", "final_metric", "run_subnet_trial", "subnet_metric",
    "ElasticSpace", "ElasticEvaluator", "ExpansionGrowthStrategy", "GrowableSpace", "GrowthEvaluator",
]

_LAZY = {
    "PruneAndGrowPruner": "._pruner", "speedup_with_masks": "._speedup",
    "OptunaTuner": "._tuner",
    "register_tuner": "._register", "unregister_tuner": "._register", "write_tuner_meta": "._register",
    "TUNER_META": "._register",
    "run_trial": ".trial", "final_metric": ".trial",
    "run_subnet_trial": ".subnet_trial", "subnet_metric": ".subnet_trial",
    "ElasticSpace": ".nas", "ElasticEvaluator": ".nas", "ExpansionGrowthStrategy": ".nas", "GrowableSpace": ".nas",
    "GrowthEvaluator": ".nas",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
