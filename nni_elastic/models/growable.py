"""A stage-and-block CNN that can grow in depth, for expansion-score growth (SECNN).

SECNN (Appolinary, Deaconu, Yang, Li, "Self Expanding Convolutional Neural Networks",
arXiv 2401.05686) grows a network by adding identity-initialised layers where the natural
expansion score says capacity is missing. This model exposes ``model.stages[i].blocks`` so such an
algorithm can grow it, and ``add_block`` appends an identity block. It is our plain ReLU CNN, not
SECNN's architecture: that one (LeakyReLU, pooling between stages, a skip from the first block to
the last, a 1x1 head) is ``secnn_cnn`` (:mod:`nni_elastic.models.secnn`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from nni_elastic.models import register_model
from nni_elastic.models._layers import init_weights


class ConvBlock(nn.Sequential):
    """Conv3x3 (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )


class ResidualBlock(nn.Module):
    """``relu(x + conv2(relu(bn(conv1(x)))))``: a residual block whose branch ends in a bias-free conv.

    With ``conv2`` zero the block is exactly the identity on non-negative inputs, in train and eval
    mode, while ``conv2`` still receives a gradient (the new outgoing weights of width growth, in
    depth), so the expansion score sees what the block could add. Skipping the block leaves the
    features it refines in the same space, which is what nested history levels need
    (:mod:`nni_elastic.expansion.nested`).
    """

    identity_at_init = True  # as built by GrowableCNN.add_block: no BatchNorm calibration needed

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.bn(self.conv1(x)))))


class GrowableStage(nn.Module):
    """An entry ConvBlock (which may downsample) followed by a growable ``blocks`` Sequential."""

    __jit_unused_properties__ = ["out_channels"]

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_blocks: int, residual: bool = False) -> None:
        super().__init__()
        self.entry = ConvBlock(in_channels, out_channels, stride)
        block = ResidualBlock if residual else (lambda c: ConvBlock(c, c))
        self.blocks = nn.Sequential(*[block(out_channels) for _ in range(num_blocks)])

    @property
    def out_channels(self) -> int:
        last = self.blocks[-1] if len(self.blocks) else self.entry
        return (last.conv2 if isinstance(last, ResidualBlock) else last.conv).out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.entry(x))


def _check_counts(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty sequence of integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} entries must be integers >= {minimum}, got {values!r}")
    return tuple(values)


class GrowableCNN(nn.Module):
    """Plain (residual-free) CNN of stages; each stage = entry ConvBlock + ``blocks`` ConvBlocks.

    The first stage's entry conv has stride 1, later ones stride 2. Then global average pool and
    a linear head.

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
        channels: output channels of each stage.
        blocks: extra (non-entry) blocks per stage, may be 0; same length as ``channels``.
        residual: the extra blocks are :class:`ResidualBlock` s (added ones start as the
            identity with a zero last conv) instead of plain ConvBlocks (added ones Dirac-initialised).

    Example:
        >>> model = GrowableCNN(10, 3, channels=(16, 32), blocks=(0, 1))
        >>> block = model.add_block(0)  # stage 0 gains an identity-initialised block
        >>> model.block_counts
        [1, 1]
    """

    __jit_unused_properties__ = ["block_counts"]

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        residual: bool = False,
    ) -> None:
        super().__init__()
        channels = _check_counts("channels", channels, 1)
        blocks = _check_counts("blocks", blocks, 0)
        if len(channels) != len(blocks):
            raise ValueError(f"channels and blocks must have the same length, got {channels!r} and {blocks!r}")
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be True or False, got {residual!r}")
        self.num_classes = num_classes
        self.residual = residual
        self.stages = nn.ModuleList()
        prev = in_channels
        for i, (width, count) in enumerate(zip(channels, blocks)):
            self.stages.append(GrowableStage(prev, width, stride=1 if i == 0 else 2, num_blocks=count, residual=residual))
            prev = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        init_weights(self)

    @property
    def block_counts(self) -> list[int]:
        """Number of extra blocks in each stage (the ``blocks`` argument that rebuilds this model)."""
        return [len(stage.blocks) for stage in self.stages]

    def add_block(self, stage_index: int) -> nn.Module:
        """Append an identity-initialised ConvBlock to a stage and return it.

        The conv is Dirac-initialised and the BN has running mean 0, running var 1, weight
        sqrt(1 + eps), bias 0, so conv and BN are both the identity in eval mode; the block's input
        is post-ReLU (non-negative), so its ReLU is the identity too. In train mode BN normalises
        with batch statistics: :func:`nni_elastic.expansion.add_block` (with ``calibration``)
        sets the BN from a training batch so that train mode is exact on it too. New parameters are
        not in any existing optimizer: the caller must add them. Updates
        ``self.nni_elastic_arch["kwargs"]["blocks"]`` when present so a checkpoint rebuilds.

        Args:
            stage_index: which stage to grow; negative indices count from the end.

        Example:
            >>> block = model.add_block(-1)
        """
        n = len(self.stages)
        if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not -n <= stage_index < n:
            raise ValueError(f"stage_index must be an integer in [{-n}, {n - 1}], got {stage_index!r}")
        stage = self.stages[stage_index]
        width = stage.out_channels
        if self.residual:
            block = ResidualBlock(width)
            init_weights(block)
            with torch.no_grad():
                block.conv2.weight.zero_()  # the branch adds nothing yet: the identity in train and eval mode
        else:
            block = ConvBlock(width, width)
            with torch.no_grad():
                nn.init.dirac_(block.conv.weight)
                block.bn.reset_running_stats()  # mean 0, var 1
                block.bn.weight.fill_(math.sqrt(1.0 + block.bn.eps))
                block.bn.bias.zero_()
        reference = next(stage.parameters())
        block.to(device=reference.device, dtype=reference.dtype)
        block.train(self.training)
        stage.blocks.append(block)
        arch = getattr(self, "nni_elastic_arch", None)
        if isinstance(arch, dict):
            arch.setdefault("kwargs", {})["blocks"] = self.block_counts
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("growable_cnn")
def growable_cnn(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    channels: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] = (1, 1, 1),
    residual: bool = False,
) -> GrowableCNN:
    """Growable stage/block CNN for SECNN-style depth growth (``residual``: residual extra blocks)."""
    return GrowableCNN(num_classes, in_channels, channels, blocks, residual)
