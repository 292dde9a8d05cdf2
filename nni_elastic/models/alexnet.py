"""AlexNet for small images (the CIFAR variant used in pruning benchmarks).

Five 3x3 stride-1 convs with 64, 192, 384, 256, 256 channels after Krizhevsky et al. 2012, each
followed by BatchNorm and ReLU. BatchNorm is not in the original AlexNet; it is added, as most
pruning papers do, so the net trains without LRN or careful learning rates. Max-pools use
``ceil_mode=True`` so 8x8 inputs survive all three; an adaptive average pool feeds the classifier.
"""
from __future__ import annotations

import torch  # noqa: F401  (used in the doctest)

from nni_elastic.models import register_model
from nni_elastic.models.vgg import VGG

# conv output channels and "M" max-pools, in the VGG cfg format
ALEXNET_CFG: tuple[int | str, ...] = (64, "M", 192, "M", 384, 256, 256, "M")


class AlexNet(VGG):
    """Small-image AlexNet: 5 conv-BN-ReLU layers, 3 max-pools, 2-layer classifier (a VGG-shaped net).

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
        super().__init__(ALEXNET_CFG, num_classes, in_channels, width_multiplier, hidden, dropout)


@register_model("alexnet")
def alexnet(*, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> AlexNet:
    """Small-image AlexNet with BatchNorm (2.5M parameters at width 1)."""
    return AlexNet(num_classes, in_channels, width_multiplier)
