"""nni-elastic: elastic CNNs with nested, runtime-switchable subnetworks for NNI and Optuna.

Example:
    >>> import torch, nni_elastic as ne
    >>> model = ne.models.create_model("resnet20", num_classes=10, in_channels=1)
    >>> em = ne.ElasticModel(model, torch.randn(1, 1, 28, 28), widths=(0.25, 0.5, 0.75, 1.0))
    >>> em.set_level(0); compact = em.export(0)
"""
from __future__ import annotations

from . import data, models
from .budget import Budgets, allocate, budgets
from .checkpoint import CheckpointError, load_compact
from .elastic import ElasticModel, Level
from .graph import UnsupportedModuleError, build_channel_graph
from .models import create_model, list_models
from .expansion import natural_expansion_score
from .strategies import (
    ElasticOptions, ExpansionGrowth, PruneAndGrow, Strategy, StrategyResult, get_strategy, list_strategies,
    register_strategy,
)
from .training import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "Budgets",
    "CheckpointError",
    "ElasticModel",
    "ElasticOptions",
    "ExpansionGrowth",
    "Level",
    "PruneAndGrow",
    "Strategy",
    "StrategyResult",
    "TrainConfig",
    "UnsupportedModuleError",
    "allocate",
    "budgets",
    "build_channel_graph",
    "create_model",
    "data",
    "get_strategy",
    "list_models",
    "list_strategies",
    "load_compact",
    "models",
    "natural_expansion_score",
    "register_strategy",
]
