"""The two methods: prune-and-grow (thesis arXiv 2505.11569) and expansion-score growth (SECNN/SENN)."""
from __future__ import annotations

from ._base import ParameterGuard, Step, StepInfo, Strategy
from .expansion_growth import ExpansionGrowth, GrowthCheckpoint, GrowthResult, load_growth_checkpoint
from .prune_and_grow import PruneAndGrow

__all__ = [
    "ExpansionGrowth", "GrowthCheckpoint", "GrowthResult", "ParameterGuard", "PruneAndGrow", "Step", "StepInfo",
    "Strategy", "load_growth_checkpoint",
]
