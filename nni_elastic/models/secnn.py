"""SECNN's modular CNN (Appolinary, Deaconu, Yang, Li, arXiv 2401.05686, sec. 3), growable in depth and width.

What we take from the paper: a network of blocks (here "stages"), each a sequence of
conv3x3-BatchNorm-LeakyReLU layers with its own capacity; pooling between blocks; a skip connection
from the first block to the last; a 1x1 convolution as the classifier head (then global average
pooling). Layers are added to a block with identity initialisation (Dirac conv, plus optional small
noise), channels are added to the convolutions of a block.

Our choices where the paper is not specific (documented deviations):

* Pooling between blocks is a 2x2 max pool; the skip from the first block's output is brought to
  the last block's resolution by average pooling and to its width by a 1x1 conv + BatchNorm, and
  added to the last block's output before the final activation.
* A new layer's activation is LeakyReLU (slope 0.01) applied to an input that already went
  through a LeakyReLU: positive activations pass unchanged, negative ones shrink by the slope
  again, so the function is preserved for non-negative features and up to about 1 % of the
  (small) negative ones. The added noise is the paper's symmetry breaking; it changes the function
  by its size. ``growable_cnn`` (ReLU) is the exact-preservation model.

Example:
    >>> model = create_model("secnn_cnn", in_channels=3, channels=(16, 32, 64), blocks=(0, 0, 0))
    >>> layer = model.add_block(1)            # block 1 gains an identity layer
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights
from nni_elastic.models.growable import _check_counts

__all__ = ["SecnnCNN", "secnn_cnn"]


class SecnnLayer(nn.Sequential):
    """Conv3x3 (no bias) -> BatchNorm -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.LeakyReLU(negative_slope),
        ))


class SecnnStage(nn.Module):
    """One SECNN block: an entry layer (changes the width) and a growable ``blocks`` Sequential of layers."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, negative_slope: float) -> None:
        super().__init__()
        self.entry = SecnnLayer(in_channels, out_channels, negative_slope)
        self.blocks = nn.Sequential(*[SecnnLayer(out_channels, out_channels, negative_slope) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.entry(x))


class SecnnCNN(nn.Module):
    """SECNN's modular CNN: blocks of conv layers, max pooling between them, a first-to-last skip, a 1x1 head.

    Args:
        num_classes, in_channels: as for every zoo model.
        channels: width of each block.
        blocks: extra (non-entry) layers per block, may be 0.
        negative_slope: of the LeakyReLU activations.
    """

    __jit_unused_properties__ = ["block_counts"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (0, 0, 0), negative_slope: float = 0.01) -> None:
        super().__init__()
        channels = _check_counts("channels", channels, 1)
        blocks = _check_counts("blocks", blocks, 0)
        if len(channels) != len(blocks):
            raise ValueError(f"channels and blocks must have the same length, got {channels!r} and {blocks!r}")
        if len(channels) < 2:
            raise ValueError(f"secnn_cnn needs at least 2 blocks (the skip joins the first to the last), got channels={channels!r}")
        self.num_classes = num_classes
        self.negative_slope = negative_slope
        self.stages = nn.ModuleList()
        prev = in_channels
        for width, count in zip(channels, blocks):
            self.stages.append(SecnnStage(prev, width, count, negative_slope))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.skip = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels[0], channels[-1], 1, bias=False), bn=nn.BatchNorm2d(channels[-1])))
        self.act = nn.LeakyReLU(negative_slope)
        self.head = nn.Conv2d(channels[-1], num_classes, 1)
        init_weights(self)

    @property
    def block_counts(self) -> list[int]:
        return [len(stage.blocks) for stage in self.stages]

    def add_block(self, stage_index: int) -> nn.Module:
        """Append an identity layer (Dirac conv, identity BN in eval mode) to a block and return it.

        :func:`nni_elastic.expansion.add_block` calibrates its BN on a training batch and adds the
        noise. Updates ``nni_elastic_arch["kwargs"]["blocks"]`` so checkpoints rebuild.
        """
        n = len(self.stages)
        if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not -n <= stage_index < n:
            raise ValueError(f"stage_index must be an integer in [{-n}, {n - 1}], got {stage_index!r}")
        stage = self.stages[stage_index]
        width = (stage.blocks[-1] if len(stage.blocks) else stage.entry).conv.out_channels
        layer = SecnnLayer(width, width, self.negative_slope)
        with torch.no_grad():
            nn.init.dirac_(layer.conv.weight)
            layer.bn.reset_running_stats()
            layer.bn.weight.fill_(float(torch.sqrt(torch.tensor(1.0 + layer.bn.eps))))
            layer.bn.bias.zero_()
        reference = next(stage.parameters())
        layer.to(device=reference.device, dtype=reference.dtype)
        layer.train(self.training)
        stage.blocks.append(layer)
        arch = getattr(self, "nni_elastic_arch", None)
        if isinstance(arch, dict):
            arch.setdefault("kwargs", {})["blocks"] = self.block_counts
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = None
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.pool(x)
            x = stage(x)
            if i == 0:
                first = x
        skip = self.skip(F.adaptive_avg_pool2d(first, x.shape[-2:]))
        x = self.act(x + skip)
        return torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1)


@register_model("secnn_cnn")
def secnn_cnn(*, num_classes: int = 10, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64),
              blocks: Sequence[int] = (0, 0, 0), negative_slope: float = 0.01, width_multiplier: float = 1.0) -> SecnnCNN:
    """SECNN's modular CNN (LeakyReLU, max pooling between blocks, first-to-last skip, 1x1 head).

    ``width_multiplier`` scales ``channels`` (as for the other zoo models).
    """
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
    channels = [max(1, round(c * width_multiplier)) for c in _check_counts("channels", channels, 1)]
    return SecnnCNN(num_classes, in_channels, channels, blocks, negative_slope)
