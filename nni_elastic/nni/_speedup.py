"""``speedup_with_masks``: physically remove the output channels that NNI-format masks zero.

NNI 3.0's ``ModelSpeedup`` traces the model with NNI's own ``concrete_trace``, which fails on
torch >= 2.2 (NNI issue 5768; with torch 2.13: ``AttributeError: 'NoneType' object has no
attribute 'startswith'`` at ``nni/common/concrete_trace_utils/concrete_tracer.py`` line 958, in
``ConcreteTracer.trace``). A small workaround makes it work for models ``torch.fx`` can trace
symbolically (every model of our zoo)::

    model.eval()                                    # its inference passes must not move BN statistics
    ModelSpeedup(model, dummy_input, masks, graph_module=torch.fx.symbolic_trace(model)).speedup_model()
    model.eval()                                    # the modules it swaps in come back in training mode

This function is the replacement that needs neither NNI's tracer nor ``torch.fx``: it builds
torch-pruning's ``DependencyGraph`` (traced through autograd, so Python control flow is fine) and
removes whole coupled channel groups, like :meth:`nni_elastic.ElasticModel.export`. On
prune-and-grow masks both give the level's compact model exactly.

Example:
    >>> model, masks = pruner.compress(); pruner.unwrap_model()
    >>> compact = speedup_with_masks(model, masks, torch.zeros(1, 1, 8, 8))
"""
from __future__ import annotations

import copy
import types
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["speedup_with_masks"]

Masks = Mapping[str, Mapping[str, Optional[torch.Tensor]]]
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def speedup_with_masks(
    model: nn.Module,
    masks: Masks,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> nn.Module:
    """A compact copy of ``model`` without the output channels that ``masks`` zero entirely.

    This is nni-elastic's replacement for NNI's ``ModelSpeedup(model, dummy_input, masks)
    .speedup_model()``, whose default tracer fails on torch >= 2.2 (NNI issue 5768). The masks are applied to the
    copy's parameters first (as ``ModelSpeedup`` does), then every output channel whose weight mask
    is all zeros is removed with torch-pruning, together with every channel coupled to it (the next
    BatchNorm, the consumers' input channels, all members of a residual sum). A coupled channel is
    removed only if every masked producer (Conv/Linear) of its group drops it and no unmasked
    producer feeds it, as NNI's mask-conflict resolution does; channels with partly zero masks stay.

    Args:
        model: the pruned model (wrapped by an NNI pruner or unwrapped; it is not modified).
        masks: ``{module_name: {"weight": mask, "bias": mask}}`` as returned by an NNI pruner's
            ``compress()`` (``None`` entries are skipped).
        example_inputs: an input batch for tracing.

    Returns:
        The compact copy: plain PyTorch modules, in the input model's train/eval mode.

    Example:
        >>> compact = speedup_with_masks(model, masks, torch.zeros(1, 3, 32, 32))
    """
    compact = copy.deepcopy(model)
    _unwrap_copy(compact)
    modules = dict(compact.named_modules())
    unknown = [name for name in masks if name not in modules]
    if unknown:
        raise ValueError(f"masks name modules that the model lacks: {unknown}; use names from model.named_modules()")
    with torch.no_grad():
        for name, targets in masks.items():
            for target, mask in (targets or {}).items():
                param = getattr(modules[name], target, None)
                if mask is not None and isinstance(param, torch.Tensor):
                    if tuple(mask.shape) != tuple(param.shape):
                        raise ValueError(f"mask {name}.{target} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
                    param.mul_(mask.to(param.device, param.dtype))
    dropped = {name: _dropped_channels(name, targets) for name, targets in masks.items()}
    dropped = {name: d for name, d in dropped.items() if d is not None}
    was_training = compact.training
    with torch.inference_mode(False), torch.enable_grad():  # torch-pruning traces through autograd
        dg = tp.DependencyGraph().build_dependency(compact, example_inputs=example_inputs, verbose=False)
        compact.train(was_training)
        for root, idxs in _plan(compact, dg, dropped):
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs).prune()
    return compact


def _dropped_channels(name: str, targets: Optional[Mapping[str, Optional[torch.Tensor]]]) -> Optional[torch.Tensor]:
    """Boolean per output channel: the weight mask is all zeros there (``None`` without a weight mask)."""
    mask = (targets or {}).get("weight")
    if mask is None:
        return None
    if mask.dim() == 0:
        raise ValueError(f"mask {name}.weight is a scalar; expected one shaped like the weight")
    return mask.reshape(mask.shape[0], -1).eq(0).all(dim=1).cpu()


def _plan(model: nn.Module, dg: tp.DependencyGraph, dropped: Dict[str, torch.Tensor]) -> list[tuple[nn.Module, list[int]]]:
    """One ``(root module, channel indices)`` per coupled group that loses channels."""
    names = {m: n for n, m in model.named_modules()}
    plan, seen = [], set()
    for name in sorted(dropped):
        root = model.get_submodule(name)
        pruner = dg.get_pruner_of_module(root)
        if root not in dg.module2node or pruner is None or not dropped[name].any():
            continue
        size = pruner.get_out_channels(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)))
        keep = torch.zeros(size, dtype=torch.bool)
        producers = []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            member_pruner = dg.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
            if member_pruner is None or handler != member_pruner.prune_out_channels:
                continue
            member = names.get(module)
            producers.append(member)
            member_drop = dropped.get(member)
            if member_drop is None:
                if isinstance(module, _PRODUCERS):  # an unmasked producer keeps every coupled channel
                    keep[:] = True
                continue
            for i, r in zip(item.idxs, item.root_idxs):
                if i >= member_drop.numel() or not member_drop[i]:
                    keep[r] = True
        key = frozenset(producers)
        if key in seen:
            continue
        seen.add(key)
        idxs = [r for r in range(size) if not keep[r]]
        if idxs:
            plan.append((root, idxs))
    return plan


def _unwrap_copy(model: nn.Module) -> None:
    """Undo NNI's module wrappers on a copy (``ModuleWrapper.unwrap``) and drop what they leave."""
    for module in list(model.modules()):
        wrapper = module.__dict__.get("_modules", {}).get("_nni_wrapper")
        if wrapper is not None:
            wrapper.unwrap()
    for module in model.modules():
        drop_restored_forward(module)


def drop_restored_forward(module: nn.Module) -> None:
    """Remove the instance ``forward`` NNI's ``unwrap`` leaves behind (it would shadow class swaps)."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, types.MethodType) and forward.__self__ is module and forward.__func__ is type(module).forward:
        del module.__dict__["forward"]
