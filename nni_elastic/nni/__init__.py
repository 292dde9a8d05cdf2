"""NNI adapter: ``PruneAndGrowPruner`` (an NNI 3.0 compression ``Pruner``) and ``speedup_with_masks``.

This is the only package that imports NNI (``import nni_elastic`` never does). The heavy
``nni.compression`` import happens on first use of a name below, so other entry points in this
package stay light.

Example:
    >>> from nni_elastic.nni import PruneAndGrowPruner, speedup_with_masks
    >>> pruner = PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
    ...                             train_data=splits.train, val_data=splits.val)
    >>> model, masks = pruner.compress(); pruner.unwrap_model()
    >>> compact = speedup_with_masks(model, masks, splits.example_inputs())
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PruneAndGrowPruner", "speedup_with_masks"]

_LAZY = {"PruneAndGrowPruner": "._pruner", "speedup_with_masks": "._speedup"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
