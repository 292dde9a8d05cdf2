"""Strategies: one contract (:class:`Strategy`), a registry, and the two methods shipped with nni-elastic.

- ``prune_and_grow``: :class:`PruneAndGrow` (thesis arXiv 2505.11569).
- ``expansion_growth``: :class:`ExpansionGrowth` (SECNN/SENN).

A new strategy is one file: an options dataclass, a :class:`Strategy` subclass and
``@register_strategy("name")`` (README, "Add a strategy"). Recipes name it in ``method:`` and load
its module with ``plugins: [module]``; installed packages may declare it in the
``nni_elastic.strategies`` entry-point group instead.
"""
from __future__ import annotations

from ._base import (
    STRATEGIES, ElasticOptions, ParameterGuard, Step, StepInfo, Strategy, StrategyResult, get_strategy,
    list_strategies, load_plugins, register_strategy,
)
from .expansion_growth import (
    ExpansionGrowth, ExpansionGrowthOptions, GrowthCheckpoint, GrowthResult, GrowthState, load_growth_checkpoint,
)
from .prune_and_grow import PruneAndGrow, PruneAndGrowOptions

__all__ = [
    "STRATEGIES", "ElasticOptions", "ExpansionGrowth", "ExpansionGrowthOptions", "GrowthCheckpoint", "GrowthResult",
    "GrowthState", "ParameterGuard", "PruneAndGrow", "PruneAndGrowOptions", "Step", "StepInfo", "Strategy",
    "StrategyResult", "get_strategy", "list_strategies", "load_growth_checkpoint", "load_plugins", "register_strategy",
]
