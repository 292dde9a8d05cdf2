"""Sliced forward passes through each module's *own* ``forward``, switched by a shared level index.

Converting a module swaps its class for a generated subclass of that very class. Its ``forward``
puts sliced views of the module's channel tensors (and the matching channel-count attributes such
as ``out_channels``, ``groups``, ``normalized_shape``) in place, runs the module's own ``forward``
and puts the full tensors back. So a subclass with its own forward (a BatchNorm followed by an
activation, a weight-standardised convolution, ``LayerNorm2d``) keeps it, parameters stay the same
objects (optimizers, state-dict keys and user references keep working), and switching a level
writes one integer.

Modules with BatchNorm running statistics hold one row of statistics per level (switchable BN);
outside a forward their ``running_mean``/``running_var`` are ``None`` and the rows live in the
``level_running_mean``/``level_running_var``/``level_num_batches_tracked`` buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

Selector = Union[None, int, torch.Tensor]  # None: all, int: prefix length, tensor: kept indices

__all__ = [
    "LevelState",
    "SliceSpec",
    "channel_tensors",
    "channel_attrs",
    "channel_count",
    "channel_blocks",
    "is_depthwise",
    "make_sliced",
    "make_plain",
    "is_sliced",
    "has_level_rows",
    "set_specs",
    "take",
]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_STATS = ("running_mean", "running_var")


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


# --------------------------------------------------------------------------- what a module slices


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every channel is its own group (in == out == groups > 1)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def channel_tensors(module: nn.Module, dim: str) -> list[tuple[str, int]]:
    """``(tensor name, axis)`` of the parameters and buffers a module indexes by its ``dim`` channels.

    ``dim`` is ``"out"``, ``"in"`` or ``"param:<name>"`` (a bare parameter of the module, sliced
    along the axis torch-pruning prunes; the axis is given by the caller). Running statistics of
    modules with per-level rows are handled separately (see :func:`make_sliced`).
    """
    if dim.startswith("param:"):
        raise ValueError("bare parameters carry their own axis")
    out: list[tuple[str, int]] = []
    if isinstance(module, nn.modules.conv._ConvNd):
        out_axis, in_axis = (1, 0) if module.transposed else (0, 1)
        if dim == "out" or is_depthwise(module):
            out.append(("weight", out_axis))
            if module.bias is not None:
                out.append(("bias", 0))
        else:
            out.append(("weight", in_axis))
    elif isinstance(module, nn.Linear):
        if dim == "out":
            out.append(("weight", 0))
            if module.bias is not None:
                out.append(("bias", 0))
        else:
            out.append(("weight", 1))
    elif isinstance(module, _NORMS):
        for name in ("weight", "bias"):
            t = getattr(module, name, None)
            if t is not None:
                out.append((name, t.dim() - 1 if isinstance(module, nn.LayerNorm) else 0))
        if not has_level_rows(module):
            out += [(name, 0) for name in _STATS if getattr(module, name, None) is not None]
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            out.append(("weight", 0))
    return out


def channel_count(module: nn.Module, dim: str) -> int:
    """The full number of ``dim`` channels of a supported module."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if dim == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.PReLU):
        return module.num_parameters
    raise TypeError(f"cannot count the channels of {type(module).__name__}")


def channel_attrs(module: nn.Module, dim: str, k: int) -> dict[str, Any]:
    """The channel-count attributes a module's forward may read, at ``k`` channels on ``dim``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if is_depthwise(module):
            return {"out_channels": k, "in_channels": k, "groups": k}
        return {"out_channels": k} if dim == "out" else {"in_channels": k}
    if isinstance(module, nn.Linear):
        return {"out_features": k} if dim == "out" else {"in_features": k}
    if isinstance(module, nn.GroupNorm):
        return {"num_channels": k}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": tuple(module.normalized_shape[:-1]) + (k,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return {"num_features": k}
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        return {"num_parameters": k}
    return {}


def channel_blocks(module: nn.Module, dim: str) -> int:
    """How many equal blocks a module splits its ``dim`` channels into (grouped conv, GroupNorm).

    A level must keep the same number of channels in every block, so the module keeps its group
    count and the level equals torch-pruning's physically pruned copy.
    """
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module):
        return module.groups
    if isinstance(module, nn.GroupNorm) and dim == "out":
        return module.num_groups
    return 1


# --------------------------------------------------------------------------- sliced classes


@dataclass
class SliceSpec:
    """How one module runs at one level.

    Attributes:
        tensors: ``(name, ((axis, selector), ...))`` for every parameter or buffer to slice.
        attrs: channel-count attributes to set during the forward.
        stats: selector of the running-statistics rows (modules with per-level rows only).
    """

    tensors: tuple[tuple[str, tuple[tuple[int, Selector], ...]], ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    stats: Selector = None

    @property
    def is_full(self) -> bool:
        return not self.tensors and not self.attrs and self.stats is None

    def to(self, device: torch.device) -> "SliceSpec":
        def move(s: Selector) -> Selector:
            return s.to(device) if isinstance(s, torch.Tensor) else s

        tensors = tuple((n, tuple((a, move(s)) for a, s in sels)) for n, sels in self.tensors)
        return SliceSpec(tensors, dict(self.attrs), move(self.stats))


class _Sliced:
    """Marker base of the generated sliced classes."""

    _ne_state: LevelState
    _ne_specs: list[SliceSpec]
    _ne_original: type


def _put(module: nn.Module, tensors: dict[str, torch.Tensor], attrs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Put ``tensors`` (by parameter/buffer name) and ``attrs`` in place; returns what they replaced."""
    params, buffers, own = module._parameters, module._buffers, module.__dict__
    saved_p = {n: params[n] for n in tensors if n in params}
    saved_b = {n: buffers.get(n) for n in tensors if n not in saved_p}
    saved_a = {n: own[n] for n in attrs}
    for name, t in tensors.items():
        (params if name in saved_p else buffers)[name] = t
    own.update(attrs)
    return saved_p, saved_b, saved_a


def _restore(module: nn.Module, saved: tuple[dict, dict, dict]) -> None:
    module._parameters.update(saved[0])
    module._buffers.update(saved[1])
    module.__dict__.update(saved[2])


def _sliced_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    base = self._ne_original.forward
    if self.__dict__.get("_ne_active"):  # re-entered from its own forward: already sliced
        return base(self, *args, **kwargs)
    spec: SliceSpec = self._ne_specs[self._ne_state.index]
    rows = "level_running_mean" in self._buffers
    if spec.is_full and not rows:
        return base(self, *args, **kwargs)
    row = self._ne_state.bn_row
    views = level_views(self, spec, row)
    saved = _put(self, views, spec.attrs)
    self.__dict__["_ne_active"] = True
    try:
        return base(self, *args, **kwargs)
    finally:
        self.__dict__.pop("_ne_active", None)
        if rows and self.training and isinstance(spec.stats, torch.Tensor):
            with torch.no_grad():  # index_select copied the statistics: write the update back
                self.level_running_mean[row].index_copy_(0, spec.stats, views["running_mean"])
                self.level_running_var[row].index_copy_(0, spec.stats, views["running_var"])
        _restore(self, saved)


def level_views(module: nn.Module, spec: SliceSpec, row: int) -> dict[str, torch.Tensor]:
    """The tensors a sliced module's forward reads at a level, by parameter/buffer name: the sliced
    views of ``spec.tensors`` and, with per-level statistics, the running statistics of ``row``."""
    views: dict[str, torch.Tensor] = {}
    for name, sels in spec.tensors:
        t = module._parameters[name] if name in module._parameters else module._buffers[name]
        for axis, sel in sels:
            t = take(t, sel, axis)
        views[name] = t
    if has_level_rows(module):
        views["running_mean"] = take(module.level_running_mean[row], spec.stats, 0)
        views["running_var"] = take(module.level_running_var[row], spec.stats, 0)
        views["num_batches_tracked"] = module.level_num_batches_tracked[row]
    return views


def _rows_load_from_state_dict(self: Any, *args: Any, **kwargs: Any) -> None:
    # skip _NormBase's upgrade of old checkpoints, which would re-add num_batches_tracked
    nn.Module._load_from_state_dict(self, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def _sliced_class(cls: type) -> type:
    if cls not in _CLASSES:
        namespace: dict[str, Any] = {"forward": _sliced_forward, "__module__": __name__}
        if issubclass(cls, nn.modules.batchnorm._NormBase):
            namespace["_load_from_state_dict"] = _rows_load_from_state_dict
        _CLASSES[cls] = type(f"Sliced{cls.__name__}", (cls, _Sliced), namespace)
    return _CLASSES[cls]


def wants_level_rows(module: nn.Module) -> bool:
    """BatchNorm with running statistics: its statistics depend on the level (switchable BN)."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    )


def make_sliced(module: nn.Module, state: LevelState, slots: int, rows: int) -> None:
    """Swap ``module``'s class for its sliced twin (in place); BatchNorm gets ``rows`` statistic rows.

    Every slot starts at full width; :func:`set_specs` fills them.
    """
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
    if wants_level_rows(module) and rows > 0:
        mean, var = module.running_mean, module.running_var
        module.register_buffer("level_running_mean", mean.detach().clone().unsqueeze(0).repeat(rows, 1))
        module.register_buffer("level_running_var", var.detach().clone().unsqueeze(0).repeat(rows, 1))
        module.register_buffer("level_num_batches_tracked", torch.zeros(rows, dtype=torch.long, device=mean.device))
        # the level rows replace the single set of statistics (restored by ``make_plain``)
        module.running_mean = None
        module.running_var = None
        module.num_batches_tracked = None
    module.__class__ = _sliced_class(original)
    module._ne_original = original
    module._ne_state = state
    module._ne_specs = [SliceSpec() for _ in range(slots)]


def set_specs(module: nn.Module, slot: int, spec: SliceSpec) -> None:
    """Set how a sliced module runs in one level slot."""
    module._ne_specs[slot] = spec


def has_level_rows(module: nn.Module) -> bool:
    return "level_running_mean" in getattr(module, "_buffers", {})


def copy_row(module: nn.Module, src: int, dst: int) -> None:
    """Copy a module's statistics row ``src`` into row ``dst``."""
    with torch.no_grad():
        for name in ("level_running_mean", "level_running_var", "level_num_batches_tracked"):
            t = module._buffers[name]
            t[dst].copy_(t[src])


def reset_row(module: nn.Module, row: int) -> None:
    """Zero mean, unit variance, no batches seen: the start of an exact re-estimation."""
    with torch.no_grad():
        module.level_running_mean[row].zero_()
        module.level_running_var[row].fill_(1.0)
        module.level_num_batches_tracked[row].zero_()


def snapshot_row(module: nn.Module, row: int) -> tuple[torch.Tensor, ...]:
    return tuple(module._buffers[n][row].clone() for n in ("level_running_mean", "level_running_var", "level_num_batches_tracked"))


def restore_row(module: nn.Module, row: int, saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in zip(("level_running_mean", "level_running_var", "level_num_batches_tracked"), saved):
            module._buffers[name][row].copy_(value)


def make_plain(module: nn.Module, bn_row: int) -> None:
    """Undo :func:`make_sliced` (on a copy): original class, the statistics of row ``bn_row``."""
    if not isinstance(module, _Sliced):
        return
    if has_level_rows(module):
        mean = module.level_running_mean[bn_row].clone()
        var = module.level_running_var[bn_row].clone()
        count = module.level_num_batches_tracked[bn_row].clone()
        for name in ("level_running_mean", "level_running_var", "level_num_batches_tracked"):
            delattr(module, name)
        module.running_mean, module.running_var, module.num_batches_tracked = mean, var, count
    for name in ("_ne_specs", "_ne_state", "_ne_active"):
        module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_ne_original")


def original_type(module: nn.Module) -> type:
    """The module's own class (before :func:`make_sliced`)."""
    return module.__dict__.get("_ne_original", type(module))


def is_sliced(module: nn.Module) -> bool:
    return isinstance(module, _Sliced)
