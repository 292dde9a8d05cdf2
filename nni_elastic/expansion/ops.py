"""Function-preserving expansions: wider channel groups and deeper blocks.

* :func:`widen_group` adds channels to a channel group of the torch-pruning dependency graph, so
  any traceable CNN grows in width, residual sums and concatenations included. Every producer of
  the group gets new output rows (Kaiming-initialised), every BatchNorm an identity entry, and every
  consumer zero input columns: the outputs are unchanged, while the gradient on the new outgoing
  weights is not zero, so the expansion score sees what the channels could contribute
  (Net2Net/GradMax-style: new outgoing weights zero). New channels are appended after the existing
  ones, so the model before growth is a prefix of the model after it.
* :func:`add_block` appends an identity-initialised block to a stage of ``growable_cnn`` or
  ``secnn_cnn`` (SECNN's identity initialisation, sec. 3); its BatchNorm is set from a training
  batch so that the function is kept in train mode too, not only in eval mode.

Both return a :class:`ParamChange` list that :func:`update_optimizer` uses to carry optimizer
state (momentum, Adam moments) over to the grown parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..graph import ChannelGroup

__all__ = ["ParamChange", "widen_group", "add_block", "identity_batchnorm", "update_optimizer"]


@dataclass
class ParamChange:
    """``old`` became ``new``: ``count`` entries inserted at ``index`` along ``dim`` (or a new parameter)."""

    old: Optional[nn.Parameter]
    new: nn.Parameter
    dim: int = 0
    index: int = 0
    count: int = 0


def _insert(t: torch.Tensor, dim: int, index: int, block: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.narrow(dim, 0, index), block, t.narrow(dim, index, t.shape[dim] - index)], dim=dim)


def _grow_param(module: nn.Module, name: str, dim: int, index: int, block: torch.Tensor, changes: list[ParamChange]) -> None:
    old = getattr(module, name)
    new = nn.Parameter(_insert(old.detach(), dim, index, block.to(old)), requires_grad=old.requires_grad)
    setattr(module, name, new)
    changes.append(ParamChange(old, new, dim, index, block.shape[dim]))


def _grow_buffer(module: nn.Module, name: str, index: int, block: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, _insert(old, 0, index, block.to(old)))


def _check_growable(model: nn.Module, group: ChannelGroup) -> None:
    """Width growth knows plain convolutions (groups=1 or depthwise), Linear and BatchNorm."""
    for member in group.members:
        module = model.get_submodule(member.module)
        conv = isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.transposed and (
            module.groups == 1 or module.groups == module.in_channels == module.out_channels
        )
        if member.axis is not None or not (conv or isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm))):
            raise ValueError(
                f"channel group {group.name!r} cannot grow in width: member {member.module!r} "
                f"({type(module).__name__}, {member.dim}) is not a plain Conv1d/Conv2d, Linear or BatchNorm; "
                "restrict growth candidates to other groups"
            )


@torch.no_grad()
def widen_group(model: nn.Module, group: ChannelGroup, count: int) -> list[ParamChange]:
    """Add ``count`` channels to a channel group in place, keeping the model's function.

    Args:
        model: the model the group was traced on (not wrapped in an ElasticModel).
        group: a group from :func:`nni_elastic.graph.build_channel_graph`.
        count: channels to add (>= 1).
    """
    if count < 1:
        raise ValueError(f"count={count!r} must be >= 1")
    _check_growable(model, group)
    changes: list[ParamChange] = []
    for member in group.members:
        module = model.get_submodule(member.module)
        stride = len(member.positions[0])
        index = max(max(p) for p in member.positions) + 1
        n_new = count * stride
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                _grow_param(module, "weight", 0, index, torch.ones(n_new), changes)
                _grow_param(module, "bias", 0, index, torch.zeros(n_new), changes)
            if module.running_mean is not None:
                _grow_buffer(module, "running_mean", index, torch.zeros(n_new))
                _grow_buffer(module, "running_var", index, torch.ones(n_new))
            module.num_features += n_new
        elif member.dim == "out":
            w = module.weight
            block = torch.empty((n_new, *w.shape[1:]), dtype=w.dtype, device=w.device)
            nn.init.kaiming_normal_(block, mode="fan_in", nonlinearity="relu")
            _grow_param(module, "weight", 0, index, block, changes)
            if module.bias is not None:
                _grow_param(module, "bias", 0, index, torch.zeros(n_new), changes)
            if isinstance(module, nn.Linear):
                module.out_features += n_new
            else:
                module.out_channels += n_new
                if module.groups > 1:  # depthwise: one filter per channel
                    module.in_channels += n_new
                    module.groups += n_new
        else:
            w = module.weight
            shape = list(w.shape)
            shape[1] = n_new
            _grow_param(module, "weight", 1, index, torch.zeros(shape, dtype=w.dtype, device=w.device), changes)
            if isinstance(module, nn.Linear):
                module.in_features += n_new
            else:
                module.in_channels += n_new
    return changes


def _input_of(model: nn.Module, module: nn.Module, inputs: torch.Tensor, training: bool) -> torch.Tensor:
    """What ``module`` receives when ``model`` runs on ``inputs`` (train or eval mode), leaving every buffer as it was.

    A train-mode forward updates the running statistics of every BatchNorm; they are put back so
    that looking does not change the model.
    """
    captured: dict[str, torch.Tensor] = {}
    hook = module.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        model.train(training)
        with torch.no_grad():
            model(inputs)
    finally:
        hook.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return captured["x"]


@torch.no_grad()
def identity_batchnorm(bn: nn.modules.batchnorm._BatchNorm, x: Optional[torch.Tensor] = None) -> None:
    """Make ``bn`` the identity in eval mode and, given its input ``x``, in train mode on that batch.

    Train mode normalises with the batch mean ``m`` and biased variance ``v`` of ``x``; with
    weight ``sqrt(v + eps)`` and bias ``m`` the normalisation is undone exactly. Setting the
    running statistics to the same ``m, v`` makes eval mode the identity for every input. Without
    ``x``: running mean 0, variance 1, weight ``sqrt(1 + eps)``, bias 0 (exact in eval mode only).
    """
    if x is None:
        mean = torch.zeros(bn.num_features, device=bn.weight.device, dtype=bn.weight.dtype)
        var = torch.ones_like(mean)
    else:
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(torch.sqrt(var + bn.eps))
    bn.bias.copy_(mean)


def add_block(model: nn.Module, stage: int, calibration: Optional[torch.Tensor] = None, noise: float = 0.0) -> list[ParamChange]:
    """Append an identity-initialised block to ``stage`` of a growable model, keeping its function.

    The model's ``add_block(stage)`` builds the block (Dirac conv: the identity in eval mode).
    ``noise`` adds Gaussian noise of that standard deviation to the new conv's weights (SECNN's
    "identity plus small noise", sec. 3: it breaks the symmetry between the new layer's filters;
    the function changes by about that much). With ``calibration`` inputs (a training batch), the
    new BatchNorm is set by :func:`identity_batchnorm` from its train-mode input on that batch:
    the model's outputs are then unchanged (up to the noise) in eval mode for every input and in
    train mode on that batch. Growth happens in train mode, so the steps after it start from
    exactly the function they had.
    """
    if not hasattr(model, "add_block"):
        raise ValueError(f"{type(model).__name__} cannot grow in depth; only growable_cnn models have blocks to add")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise={noise!r} must be a number >= 0")
    block = model.add_block(stage)
    conv = getattr(block, "conv", None)
    if noise > 0 and isinstance(conv, nn.Conv2d):
        with torch.no_grad():
            conv.weight.add_(noise * torch.randn_like(conv.weight))
    bn = getattr(block, "bn", None)
    # a block that is the identity by construction (a residual branch ending in a zero conv) keeps its BatchNorm
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not getattr(block, "identity_at_init", False):
        identity_batchnorm(bn, None if calibration is None else _input_of(model, bn, calibration, training=True))
    return [ParamChange(None, p) for p in block.parameters()]


def update_optimizer(optimizer: torch.optim.Optimizer, changes: list[ParamChange]) -> None:
    """Swap grown parameters into ``optimizer`` in place, carrying their state over.

    Old entries keep their momentum/moments; inserted entries start at zero; new parameters join
    the first parameter group with empty state. LR schedulers bound to the optimizer keep working.
    """
    group = optimizer.param_groups[0]
    for change in changes:
        if change.old is None:
            group["params"].append(change.new)
            continue
        for g in optimizer.param_groups:
            for i, p in enumerate(g["params"]):
                if p is change.old:
                    g["params"][i] = change.new
        state = optimizer.state.pop(change.old, None)
        if state:
            grown = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == change.old.shape:
                    shape = list(value.shape)
                    shape[change.dim] = change.count
                    value = _insert(value, change.dim, change.index, torch.zeros(shape, dtype=value.dtype, device=value.device))
                grown[key] = value
            optimizer.state[change.new] = grown
