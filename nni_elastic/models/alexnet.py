"""AlexNet for small images (the CIFAR variant used in pruning benchmarks).

Five 3x3 stride-1 convs with 64, 192, 384, 256, 256 channels after Krizhevsky et al. 2012, each
followed by BatchNorm and ReLU. BatchNorm is not in the original AlexNet; it is added, as most
pruning papers do, so the net trains without LRN or careful learning rates. Max-pools use
``ceil_mode=True`` so 8x8 inputs survive all three; an adaptive average pool feeds the classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights, scaled

# (out channels, max-pool after this conv)
ALEXNET_CFG: tuple[tuple[int, bool], ...] = ((64, True), (192, True), (384, False), (256, False), (256, True))


class AlexNet(nn.Module):
    """Small-image AlexNet: 5 conv-BN-ReLU layers, 3 max-pools, 2-layer classifier.

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
        width_multiplier: scales every conv width and the classifier hidden size.
        hidden: classifier hidden size before scaling.
        dropout: dropout probability in the classifier.

    Example:
        >>> AlexNet(num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        hidden: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width, pool in ALEXNET_CFG:
            out = scaled(width, width_multiplier)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        hidden = scaled(hidden, width_multiplier)
        self.num_classes = num_classes
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("alexnet")
def alexnet(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> AlexNet:
    """Small-image AlexNet with BatchNorm (2.5M parameters at width 1)."""
    return AlexNet(num_classes, in_channels, width_multiplier)
