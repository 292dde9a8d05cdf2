"""VGG-16 with BatchNorm for small images (the CIFAR variant common in pruning papers).

Conv 3x3-BN-ReLU stacks as in Simonyan & Zisserman 2015 (configuration D). Each max-pool is
``MaxPool2d(2, ceil_mode=True)``, which maps 1x1 to 1x1, so inputs as small as 8x8 pass all five
pools; an adaptive average pool then feeds a 512-512-classes classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights, scaled

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """VGG features from a cfg of channel counts and ``"M"`` pools, then a two-layer classifier.

    Args:
        cfg: conv output channels, ``"M"`` for a 2x2 max-pool.
        num_classes: classifier outputs.
        in_channels: input image channels.
        width_multiplier: scales every conv width and the classifier hidden size.
        hidden: classifier hidden size before scaling.
        dropout: dropout probability in the classifier.

    Example:
        >>> VGG(VGG16_CFG, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out = scaled(int(item), width_multiplier)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
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


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> VGG:
    """VGG-16 with BatchNorm for small images (15M parameters at width 1)."""
    return VGG(VGG16_CFG, num_classes, in_channels, width_multiplier)
