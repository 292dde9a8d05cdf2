"""The shared measuring tools: MACs and parameters, latency, and budgets relative to a full model.

One implementation of each, used by ``ElasticModel`` (level table, ``pick_level``), the subnet
searches (NNI and Optuna) and the strategies:

- :func:`count_ops` / :func:`count_macs`: ``torch_pruning.utils.count_ops_and_params`` at batch 1.
- :func:`latency_ms`: median time of a forward in milliseconds, with ``torch.utils.benchmark.Timer``
  (which synchronises CUDA around every run), at the process's thread count.
- :func:`budget`: ``None`` -> no limit; a value <= 1 -> a fraction of the full count; larger -> absolute.

Example:
    >>> macs, params = count_ops(model, torch.zeros(1, 3, 32, 32))
    >>> cap = budget(0.5, macs, "max_macs")       # half the full MACs
    >>> ms = latency_ms(model, torch.zeros(1, 3, 32, 32))
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils import benchmark

__all__ = ["count_ops", "count_macs", "latency_ms", "median_ms", "budget"]


def count_ops(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """``(MACs, params)`` of ``model`` on ``example`` (torch-pruning's counter; the model is not changed)."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model`` on ``example``."""
    return count_ops(model, example)[0]


def median_ms(run: Callable[[], Any], repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeats`` timed calls after ``warmup`` untimed ones."""
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    if warmup:
        timer.timeit(warmup)
    return 1000.0 * statistics.median(timer.timeit(1).median for _ in range(max(1, repeats)))


@torch.inference_mode()
def latency_ms(net: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median forward time (ms) of ``net`` on ``example`` in eval mode (its mode is restored)."""
    was_training = net.training
    net.eval()
    try:
        return median_ms(lambda: net(example), repeats, warmup)
    finally:
        net.train(was_training)


def budget(value: Optional[Union[int, float]], full: float, name: str) -> float:
    """A budget as an absolute count: ``value * full`` if ``value <= 1``, else ``value``; None: ``inf``.

    Raises ``ValueError`` naming ``name`` when the value is not a positive number.
    """
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")
    return value * full if value <= 1 else float(value)
