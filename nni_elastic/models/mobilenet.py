"""A tiny MobileNetV2 (Sandler et al. 2018) for tests of depthwise convs and residual adds.

Inverted residual blocks: 1x1 expand conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 linear
project conv-BN, with a residual add when stride is 1 and input and output widths match.
"""
from __future__ import annotations

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights, scaled

# (out channels, stride) of each inverted residual block; blocks 1 and 3 have residual adds.
MOBILENETV2_TINY_CFG: tuple[tuple[int, int], ...] = ((16, 1), (24, 2), (24, 1), (32, 2))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_channels)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1, optional residual add."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Sequential(*_conv_bn(in_channels, hidden, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6())
        self.project = nn.Sequential(*_conv_bn(hidden, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2Tiny(nn.Module):
    """Stem conv, four inverted residual blocks (16-32 channels, expansion 4), 1x1 head, linear.

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
        width_multiplier: scales every width.

    Example:
        >>> MobileNetV2Tiny(num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> None:
        super().__init__()
        stem = scaled(16, width_multiplier)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, stem, 3), nn.ReLU6())]
        prev = stem
        for width, stride in MOBILENETV2_TINY_CFG:
            out = scaled(width, width_multiplier)
            layers.append(InvertedResidual(prev, out, stride))
            prev = out
        head = scaled(128, width_multiplier)
        layers.append(nn.Sequential(*_conv_bn(prev, head, 1), nn.ReLU6()))
        self.num_classes = num_classes
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("mobilenetv2_tiny")
def mobilenetv2_tiny(
    *, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0
) -> MobileNetV2Tiny:
    """Tiny MobileNetV2 (depthwise convs, residual adds) for elastic-width tests."""
    return MobileNetV2Tiny(num_classes, in_channels, width_multiplier)
