"""Growth history as nested sub-networks of the grown model, trained jointly until the end.

Every expansion keeps the model before it inside the model after it: width growth appends
channels (the old tensors are a prefix, along every dimension, of the new ones) and depth growth
appends blocks (the old model is the new one with those blocks skipped). A :class:`NestedLevel`
holds the architecture of such an earlier model (a copy of it taken just before the expansion)
and runs it on the *current* model's weights: each of its parameters is the leading slice of the
current parameter of the same name, so gradients flow into the shared weights. Its BatchNorm
running statistics are its own (switchable BatchNorm statistics, Universally Slimmable Networks):
the shared layers after a skipped block see other statistics at each level. With
``private_bn=True`` its BatchNorm weights and biases are its own too (switchable BatchNorm of
Slimmable Networks, Yu et al. 2018): a few parameters per level that the caller adds to the
optimizer (:meth:`NestedLevel.own_parameters`).

:func:`nested_step` trains the grown model on the labels and one (or more) history levels per
optimizer step on the grown model's detached soft predictions (the sandwich rule's in-place
distillation, Yu & Huang 2019, as :func:`nni_elastic.training.elastic_step` does for the levels
of an ElasticModel), in one backward pass. :meth:`NestedLevel.export` gives the level as a
standalone copy of its architecture with the current weights, loadable like any growth
checkpoint.

Example:
    >>> level = NestedLevel(copy.deepcopy(model))           # before an expansion
    >>> widen_group(model, build_channel_graph(model, x[:1]).groups[0], 4)
    >>> torch.equal(level(model, x), level.export(model)(x))  # in eval mode: True
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["NestedLevel", "choose_levels", "nested_step"]


class NestedLevel:
    """An earlier architecture of a growing model, run on the leading slices of the current weights.

    Args:
        skeleton: a model with the earlier architecture (e.g. a deep copy taken just before an
            expansion); its parameters' values are not used once the model has grown, its
            buffers (BatchNorm statistics) are the level's own.
        private_bn: the level's BatchNorm weights and biases are its own (trainable, starting
            from the skeleton's values) instead of slices of the model's.
    """

    def __init__(self, skeleton: nn.Module, private_bn: bool = False) -> None:
        self.skeleton = skeleton
        own = set()
        if private_bn:
            for mname, m in skeleton.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    own |= {f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)}
        self.shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters() if name not in own}
        for name, p in skeleton.named_parameters():
            p.requires_grad_(name in own)

    def own_parameters(self) -> dict[str, nn.Parameter]:
        """The level's own trainable parameters (``private_bn``), by name; none otherwise."""
        return {n: p for n, p in self.skeleton.named_parameters() if n not in self.shapes}

    def check(self, model: nn.Module) -> None:
        """Refuse a model this level is not nested in (a parameter missing or smaller than the level's)."""
        params = dict(model.named_parameters())
        for name, shape in self.shapes.items():
            p = params.get(name)
            if p is None or p.dim() != len(shape) or any(n < o for n, o in zip(p.shape, shape)):
                found = None if p is None else tuple(p.shape)
                raise ValueError(f"history level not nested in the model: parameter {name!r} has shape {found}, "
                                 f"the level needs a prefix of shape {shape}")

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The level's parameters: the leading slices of ``model``'s parameters (views, gradients flow through)."""
        params = dict(model.named_parameters())
        out = {}
        for name, shape in self.shapes.items():
            p = params[name]
            out[name] = p if tuple(p.shape) == shape else p[tuple(slice(0, n) for n in shape)]
        return out

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The level's output on ``x`` with ``model``'s weights, in ``model``'s mode (train mode updates the level's own statistics)."""
        self.skeleton.train(model.training)
        return functional_call(self.skeleton, self.weights(model), (x,), strict=False)

    @torch.no_grad()
    def export(self, model: nn.Module) -> nn.Module:
        """A standalone copy of the level's architecture holding ``model``'s current (sliced) weights and the level's statistics."""
        out = copy.deepcopy(self.skeleton)
        for name, value in self.weights(model).items():
            out.get_parameter(name).copy_(value)
        for p in out.parameters():
            p.requires_grad_(True)
        return out.train(model.training)

    def state(self) -> dict[str, torch.Tensor]:
        """The level's own tensors, buffers and own parameters (for a resume state)."""
        own = {**dict(self.skeleton.named_buffers()), **self.own_parameters()}
        return {k: v.detach().cpu().clone() for k, v in own.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in {**dict(self.skeleton.named_buffers()), **self.own_parameters()}.items():
                t.copy_(state[name])

    def to(self, device: torch.device) -> "NestedLevel":
        self.skeleton.to(device)
        return self


def nested_step(model: nn.Module, levels: Sequence[NestedLevel], x: torch.Tensor, y: torch.Tensor,
                distill: float = 1.0, weight: float = 1.0, base: Optional[nn.Module] = None) -> torch.Tensor:
    """One joint step: ``model`` on the labels, each of ``levels`` on ``model``'s detached soft predictions.

    The loss of a level is ``distill * KL(level || model) + (1 - distill) * CE(level, y)``, scaled
    by ``weight``; everything is summed and back-propagated once (the gradient of every shared
    weight accumulates over the levels). Returns the model's label loss.

    Args:
        model: the grown model, or the wrapper it trains through (then pass ``base``).
        levels: the history levels this step trains (any number, none for a plain step).
        distill: share of in-place distillation in a level's loss (1: soft targets only).
        weight: factor of the levels' losses.
        base: the grown model whose weights the levels slice (default: ``model``).
    """
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    total = loss
    if levels:
        soft = logits.detach().softmax(dim=1)
        base = model if base is None else base
        for level in levels:
            out = level(base, x)
            part = 0.0
            if distill > 0:
                part = distill * F.kl_div(out.log_softmax(dim=1), soft, reduction="batchmean")
            if distill < 1:
                part = part + (1.0 - distill) * F.cross_entropy(out, y)
            total = total + weight * part
    total.backward()
    return loss.detach()


def choose_levels(count: int, step: int, per_step: Optional[int], smallest: bool = False) -> list[int]:
    """The history levels a step trains: all (``per_step=None``) or ``per_step`` of them in turn (round robin).

    ``smallest``: level 0 at every step (the sandwich rule's smallest network) and ``per_step`` of
    the others in turn.
    """
    if count == 0:
        return []
    if smallest:
        return [0] + [1 + i for i in choose_levels(count - 1, step, per_step)]
    if per_step is None or per_step >= count:
        return list(range(count))
    return sorted({(step * per_step + i) % count for i in range(per_step)})
