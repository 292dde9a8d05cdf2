"""A tiny DenseNet (Huang et al. 2017) for tests of channel concatenation.

Two dense blocks of three BN-ReLU-Conv3x3 layers (growth rate 8) whose outputs are concatenated
onto their inputs, joined by a BN-ReLU-Conv1x1 transition (compression 0.5) and a 2x2 average
pool; final BN-ReLU, global average pool and a linear head.
"""
from __future__ import annotations

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights, scaled


class DenseLayer(nn.Module):
    """BN -> ReLU -> Conv3x3 producing ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.bn(x)))


class DenseBlock(nn.Module):
    """Layers that each see the concatenation of the block input and all earlier outputs."""

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate) for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transition(nn.Sequential):
    """BN -> ReLU -> Conv1x1 -> AvgPool2d(2), halving spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2, ceil_mode=True),
        )


class DenseNetTiny(nn.Module):
    """3x3 stem, dense block, transition, dense block, BN-ReLU, pool, linear.

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
        width_multiplier: scales the growth rate (and the stem, which is twice the growth rate).
        growth_rate: channels each dense layer adds, before scaling.
        layers: dense layers per block.

    Example:
        >>> DenseNetTiny(num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        growth_rate: int = 8,
        layers: tuple[int, int] = (3, 3),
    ) -> None:
        super().__init__()
        growth = scaled(growth_rate, width_multiplier)
        stem = 2 * growth
        block1 = DenseBlock(stem, growth, layers[0])
        middle = max(1, block1.out_channels // 2)
        block2 = DenseBlock(middle, growth, layers[1])
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            block1,
            Transition(block1.out_channels, middle),
            block2,
            nn.BatchNorm2d(block2.out_channels),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(block2.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("densenet_tiny")
def densenet_tiny(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> DenseNetTiny:
    """Tiny DenseNet (channel concatenation) for elastic-width tests."""
    return DenseNetTiny(num_classes, in_channels, width_multiplier)
