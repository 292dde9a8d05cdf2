"""Natural expansion score and function-preserving expansions (SENN / SECNN)."""
from __future__ import annotations

from .ops import ParamChange, add_block, identity_batchnorm, update_optimizer, widen_group
from .score import DiagonalFisher, FisherGram, natural_expansion_score, per_sample_gradients

__all__ = ["DiagonalFisher", "FisherGram", "ParamChange", "add_block", "identity_batchnorm", "natural_expansion_score", "per_sample_gradients", "update_optimizer", "widen_group"]
