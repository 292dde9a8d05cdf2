"""Tiny helpers shared by the model files: channel scaling and weight init."""
from __future__ import annotations

import math

from torch import nn


def check_width_multiplier(width_multiplier: float) -> None:
    """Raise ``ValueError`` unless ``width_multiplier`` is a finite number > 0."""
    if (
        isinstance(width_multiplier, bool)
        or not isinstance(width_multiplier, (int, float))
        or not math.isfinite(width_multiplier)
        or width_multiplier <= 0
    ):
        raise ValueError(f"width_multiplier must be a finite number > 0, got {width_multiplier!r}")


def scaled(channels: int, width_multiplier: float) -> int:
    """Scale a channel count, rounding half up and never going below 1.

    Example:
        >>> scaled(16, 0.5), scaled(16, 0.01)
        (8, 1)
    """
    check_width_multiplier(width_multiplier)
    return max(1, math.floor(channels * width_multiplier + 0.5))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias; BatchNorm weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
