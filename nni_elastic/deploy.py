"""Deployment transformations of plain models: BatchNorm folded into the layer before it, and the
memory format chosen by measuring.

A BatchNorm in eval mode is an affine map per channel, so when it reads the output of a
convolution or linear layer and nothing else reads that output, it folds into the layer's weight
and bias (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``) and becomes
an ``nn.Identity``. The pairs come from torch-pruning's dependency graph; only the exact
``torch.nn`` classes fold (a subclass may do more in its forward, e.g. an activation).

Example:
    >>> deployed = deploy(plain_model, torch.randn(64, 3, 32, 32))   # folded, channels-last if faster
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .graph import trace
from .measure import latency_ms

__all__ = ["fold_pairs", "fold_batchnorm", "folded_weights", "deploy", "MEMORY_FORMATS"]

logger = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def _exact(module: object, types: tuple[type, ...]) -> bool:
    from ._slicing import original_type

    return original_type(module) in types if isinstance(module, nn.Module) else False


def fold_pairs(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` module paths where the BatchNorm is the only reader of the layer's output."""
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    try:
        dg = trace(model.eval(), example_inputs)
    finally:
        model.train(was_training)
    pairs = []
    for module, node in dg.module2node.items():
        if not _exact(module, _BN) or not module.track_running_stats:
            continue
        if len(node.inputs) != 1:
            continue
        layer = node.inputs[0]
        if not _exact(layer.module, _LAYERS) or len(layer.outputs) != 1:
            continue
        if isinstance(layer.module, nn.modules.conv._ConvNd) and layer.module.transposed:
            continue
        pairs.append((names[layer.module], names[module]))
    return pairs


def folded_weights(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a layer followed by an eval-mode BatchNorm, as one layer (output channels on axis 0)."""
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias * scale + shift
    return w, b


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold every ``(layer, batchnorm)`` pair of ``model`` in place; the BatchNorms become ``nn.Identity``."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w, b = folded_weights(layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        layer.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        layer.bias = nn.Parameter(b.contiguous(), requires_grad=False)
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def _is_image_model(model: nn.Module, example: torch.Tensor) -> bool:
    return example.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.inference_mode()
def choose_memory_format(model: nn.Module, example: torch.Tensor, repeats: int = 10) -> str:
    """``"channels_last"`` or ``"contiguous"``: whichever runs ``model`` on ``example`` faster here."""
    if not _is_image_model(model, example):
        return "contiguous"
    candidate = copy.deepcopy(model).to(memory_format=torch.channels_last)
    plain = latency_ms(model, example.contiguous(), repeats=repeats, warmup=3)
    last = latency_ms(candidate, example.contiguous(memory_format=torch.channels_last), repeats=repeats, warmup=3)
    choice = "channels_last" if last < plain else "contiguous"
    logger.info("memory format: %s (contiguous %.3f ms, channels_last %.3f ms)", choice, plain, last)
    return choice


def deploy(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    fold: bool = True,
    memory_format: str = "auto",
    compile: bool = False,
) -> nn.Module:
    """A copy of a plain model for inference: BatchNorm folded, memory format chosen by measuring.

    Args:
        model: a plain (exported) model.
        example_inputs: a batch of the size it will serve (the memory format is timed on it).
        fold: fold BatchNorm into the layer before it.
        memory_format: ``"auto"`` (measure), ``"contiguous"`` or ``"channels_last"``.
        compile: also ``torch.compile`` it with inductor's weight freezing (compiled on
            ``example_inputs`` now; for inference without gradients); when no compiler works
            here, the uncompiled copy is returned with a warning saying so.

    The copy records its choices in ``nni_elastic_deploy`` (folded pairs, memory format); with
    channels-last weights, feed channels-last inputs (``x.contiguous(memory_format=torch.channels_last)``).
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={memory_format!r} is not supported; use one of {MEMORY_FORMATS}")
    out = copy.deepcopy(model).eval()
    pairs = fold_pairs(out, example_inputs) if fold else []
    fold_batchnorm(out, pairs)
    if memory_format == "auto":
        memory_format = choose_memory_format(out, example_inputs)
    if memory_format == "channels_last":
        if not _is_image_model(out, example_inputs):
            raise ValueError("memory_format='channels_last' needs a model with Conv2d layers and 4-D inputs")
        out = out.to(memory_format=torch.channels_last)
    out.nni_elastic_deploy = {"folded": [list(p) for p in pairs], "memory_format": memory_format, "compiled": False}
    if compile:
        x = example_inputs.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else example_inputs
        try:
            # freezing: weights become constants, so the compiler folds and prepacks them (inference only)
            compiled = torch.compile(out, options={"freezing": True})
            with torch.no_grad():
                compiled(x)  # compile now, so a missing compiler shows here and not in production
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: say what happened
            message = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); the deploy export runs uncompiled"
            logger.warning(message)
            warnings.warn(message, stacklevel=2)
        else:
            out.nni_elastic_deploy["compiled"] = True
            return compiled
    return out
