"""The two methods: prune-and-grow (thesis arXiv 2505.11569) and expansion-score growth (SECNN/SENN)."""
from __future__ import annotations

from ._base import ParameterGuard, Step, StepInfo, Strategy
from .prune_and_grow import PruneAndGrow

__all__ = ["ParameterGuard", "PruneAndGrow", "Step", "StepInfo", "Strategy"]
