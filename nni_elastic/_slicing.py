"""Sliced forward passes for Conv, Linear and BatchNorm, switched by a shared level index.

Converting a module swaps its class for a subclass whose ``forward`` reads the active level from
one shared :class:`LevelState`; parameters stay the same objects, so optimizers, state-dict keys
and user references keep working, and switching a level writes one integer.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Selector = Union[None, int, torch.Tensor]  # None: all, int: prefix length, tensor: kept indices


class LevelState:
    """The active level, shared by every sliced module of one elastic model."""

    __slots__ = ("index", "bn_row")

    def __init__(self) -> None:
        self.index = 0
        self.bn_row = 0

    def __getstate__(self) -> tuple[int, int]:
        return (self.index, self.bn_row)

    def __setstate__(self, state: tuple[int, int]) -> None:
        self.index, self.bn_row = state


def take(t: Optional[torch.Tensor], sel: Selector, dim: int) -> Optional[torch.Tensor]:
    if t is None or sel is None:
        return t
    if isinstance(sel, int):
        return t.narrow(dim, 0, sel)
    return t.index_select(dim, sel)


class _Sliced:
    """Mixin: ``_ne_specs[level] = (out_selector, in_selector)``."""

    _ne_state: LevelState
    _ne_specs: list[tuple[Selector, Selector]]
    _ne_original: type

    def _ne_spec(self) -> tuple[Selector, Selector]:
        return self._ne_specs[self._ne_state.index]


class SlicedConv(_Sliced, nn.Conv2d):
    """Conv1d/Conv2d computing only the active output and input channels (groups=1 or depthwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_sel, in_sel = self._ne_spec()
        w = take(take(self.weight, out_sel, 0), in_sel, 1)
        b = take(self.bias, out_sel, 0)
        groups = w.shape[0] if self._ne_depthwise else 1
        fn = F.conv2d if self._ne_ndim == 2 else F.conv1d
        return fn(x, w, b, self.stride, self.padding, self.dilation, groups)


class SlicedLinear(_Sliced, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_sel, in_sel = self._ne_spec()
        return F.linear(x, take(take(self.weight, out_sel, 0), in_sel, 1), take(self.bias, out_sel, 0))


class SlicedBatchNorm(_Sliced, nn.BatchNorm2d):
    """BatchNorm with one row of running statistics per level (switchable BN, Yu et al. 2019).

    ``level_running_mean``/``level_running_var`` have shape ``[rows, C]``; the row is
    ``LevelState.bn_row`` (the level index with per-level statistics, 0 with shared ones).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:  # accepts 2D/3D/4D like BatchNorm1d/2d
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input to BatchNorm, got {x.dim()}D")

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # skip _NormBase's upgrade of old checkpoints, which would re-add num_batches_tracked
        nn.Module._load_from_state_dict(self, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_sel, _ = self._ne_spec()
        row = self._ne_state.bn_row
        w, b = take(self.weight, out_sel, 0), take(self.bias, out_sel, 0)
        mean_row, var_row = self.level_running_mean[row], self.level_running_var[row]
        if not self.training:
            return F.batch_norm(x, take(mean_row, out_sel, 0), take(var_row, out_sel, 0), w, b, False, 0.0, self.eps)
        self.level_num_batches_tracked[row] += 1
        factor = 1.0 / float(self.level_num_batches_tracked[row]) if self.momentum is None else self.momentum
        if out_sel is None or isinstance(out_sel, int):
            # prefix views: batch_norm updates the stored rows in place
            return F.batch_norm(x, take(mean_row, out_sel, 0), take(var_row, out_sel, 0), w, b, True, factor, self.eps)
        mean, var = mean_row.index_select(0, out_sel), var_row.index_select(0, out_sel)
        y = F.batch_norm(x, mean, var, w, b, True, factor, self.eps)
        with torch.no_grad():
            mean_row.index_copy_(0, out_sel, mean)
            var_row.index_copy_(0, out_sel, var)
        return y


def make_sliced(module: nn.Module, state: LevelState, rows: int) -> None:
    """Swap ``module``'s class for its sliced twin (in place); BatchNorm gets ``rows`` stat rows."""
    original = type(module)
    patched = module.__dict__.get("forward")
    if patched is not None:
        # some tools (NNI's wrappers after unwrap) leave an instance ``forward`` that would hide ours
        if getattr(patched, "__func__", None) is original.forward and getattr(patched, "__self__", None) is module:
            del module.__dict__["forward"]
        else:
            raise ValueError(
                f"{original.__name__} module has a patched forward ({patched!r}); remove the patch (e.g. unwrap "
                "the model from the compression tool) before wrapping it in an ElasticModel"
            )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(f"BatchNorm {module!r} without running statistics cannot hold per-level statistics")
        mean, var = module.running_mean, module.running_var
        module.__class__ = SlicedBatchNorm
        module.register_buffer("level_running_mean", mean.detach().clone().unsqueeze(0).repeat(rows, 1))
        module.register_buffer("level_running_var", var.detach().clone().unsqueeze(0).repeat(rows, 1))
        module.register_buffer(
            "level_num_batches_tracked", torch.zeros(rows, dtype=torch.long, device=mean.device)
        )
        # the level rows replace the single set of statistics (restored by ``make_plain``)
        module.running_mean = None
        module.running_var = None
        module.num_batches_tracked = None
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        depthwise, ndim = module.groups > 1, (1 if isinstance(module, nn.Conv1d) else 2)
        module.__class__ = SlicedConv
        module._ne_depthwise = depthwise
        module._ne_ndim = ndim
    elif isinstance(module, nn.Linear):
        module.__class__ = SlicedLinear
    else:  # pragma: no cover - graph.build_channel_graph rejects these first
        raise TypeError(f"cannot slice {original.__name__}")
    module._ne_original = original
    module._ne_state = state
    module._ne_specs = []


def resize_bn_rows(module: SlicedBatchNorm, rows: int, copy_from: list[int]) -> None:
    """Give a sliced BatchNorm ``rows`` statistic rows; new row ``i`` copies old row ``copy_from[i]``."""
    idx = torch.tensor(copy_from, dtype=torch.long, device=module.level_running_mean.device)
    module.level_running_mean = module.level_running_mean.index_select(0, idx).clone()
    module.level_running_var = module.level_running_var.index_select(0, idx).clone()
    module.level_num_batches_tracked = module.level_num_batches_tracked.index_select(0, idx).clone()


def make_plain(module: nn.Module, bn_row: int) -> None:
    """Undo :func:`make_sliced` on a copy: original class, BatchNorm statistics of ``bn_row``."""
    if not isinstance(module, _Sliced):
        return
    if isinstance(module, SlicedBatchNorm):
        mean = module.level_running_mean[bn_row].clone()
        var = module.level_running_var[bn_row].clone()
        count = module.level_num_batches_tracked[bn_row].clone()
        for name in ("level_running_mean", "level_running_var", "level_num_batches_tracked"):
            delattr(module, name)
        module.running_mean, module.running_var, module.num_batches_tracked = mean, var, count
    for name in ("_ne_specs", "_ne_state", "_ne_depthwise", "_ne_ndim"):
        module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_ne_original")


def is_sliced(module: nn.Module) -> bool:
    return isinstance(module, _Sliced)
