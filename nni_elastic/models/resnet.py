"""CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning", section 4.2).

A 3x3 stem with 16 channels, three stages of ``n`` BasicBlocks with 16/32/64 channels (stride 2
entering stages 2 and 3), global average pooling and a linear head: depth = 6n + 2.
Shortcuts that change shape use a 1x1 conv + BN projection (option B of the paper), which gives
pruning a real layer to couple with instead of zero-padding.
"""
from __future__ import annotations

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights, scaled

STAGE_CHANNELS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + shortcut)


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n + 2.

    Args:
        depth: total weighted layers, 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        in_channels: input image channels.
        width_multiplier: scales the 16/32/64 stage widths (rounded, at least 1).

    Example:
        >>> model = ResNetCifar(depth=20, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}")
        n = (depth - 2) // 6
        widths = [scaled(c, width_multiplier) for c in STAGE_CHANNELS]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[0], widths[0], n, stride=1)
        self.layer2 = self._make_stage(widths[0], widths[1], n, stride=2)
        self.layer3 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride)]
        blocks += [BasicBlock(channels, channels) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet_cifar")
def resnet_cifar(
    *, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0
) -> ResNetCifar:
    """CIFAR ResNet of any depth 6n + 2, e.g. ``create_model("resnet_cifar", depth=32)``."""
    return ResNetCifar(depth, num_classes, in_channels, width_multiplier)


@register_model("resnet20")
def resnet20(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> ResNetCifar:
    """ResNet-20 (n = 3, 0.27M parameters at width 1)."""
    return ResNetCifar(20, num_classes, in_channels, width_multiplier)


@register_model("resnet56")
def resnet56(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> ResNetCifar:
    """ResNet-56 (n = 9, 0.86M parameters at width 1)."""
    return ResNetCifar(56, num_classes, in_channels, width_multiplier)
