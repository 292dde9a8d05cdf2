"""Shared helpers of the elastic-core property tests (``test_graph.py``, ``test_elastic.py``) and the prune-and-grow tests."""
from __future__ import annotations

import torch
from torch import nn

#: every model of the zoo the elastic core must handle (plain, residual, Linear hidden layers,
#: depthwise convs, concatenation)
ZOO = ("resnet20", "resnet56", "vgg16_bn", "alexnet", "growable_cnn", "mobilenetv2_tiny", "densenet_tiny")
NUM_CLASSES = 10
SIZE = 16  # input side: small enough to be fast, large enough for every zoo model
TOL = 1e-5  # relative to the largest |output|


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference divided by the output scale (random-init ResNet-56 outputs are large)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() / scale


def perturb_bn(model: nn.Module, x: torch.Tensor, seed: int = 0, steps: int = 3) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Random affine parameters make BN-scale importance rank channels differently from the
    identity; a few train-mode forwards populate the running statistics.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        was_training = model.training
        model.train()
        for _ in range(steps):
            model(x + 0.5 * torch.randn(x.shape, generator=gen))
        model.train(was_training)


def batch(in_channels: int = 3, n: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def digits_resnet20(seed: int = 0) -> nn.Module:
    """A ResNet-20 for the digits data (one input channel, 10 classes), initialised by ``seed``."""
    import nni_elastic as ne

    torch.manual_seed(seed)
    return ne.create_model("resnet20", num_classes=NUM_CLASSES, in_channels=1)
