"""``ElasticModel``: one network holding nested, runtime-switchable subnetworks ("levels").

A level keeps the first ``k`` channels of every elastic channel group (see :mod:`nni_elastic.graph`).
Channels are ranked and reordered once, so every level is a prefix of the next: the levels are
nested and share weights. Switching a level writes one integer; a small level slices the weights
and really computes less. ``export(level)`` returns a physically pruned copy (torch-pruning
``Group.prune``) whose outputs equal the sliced level's.

Example:
    >>> em = ElasticModel(model, torch.randn(1, 3, 32, 32), widths=(0.25, 0.5, 1.0))
    >>> em.set_level(0); y = em(x)
    >>> compact = em.export(0)
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import _slicing
from .checkpoint import PathLike, atomic_save
from .graph import (
    GRADIENT_IMPORTANCES,
    ChannelGraph,
    ImportanceFn,
    build_channel_graph,
    keep_indices,
    rank_channels,
    reorder_channels,
)

__all__ = ["ElasticModel", "Level", "BN_MODES"]

logger = logging.getLogger(__name__)

BN_MODES = ("per_level", "shared")
FORMAT = "nni-elastic/elastic-model"
FORMAT_VERSION = 1

LevelLike = Union[int, float, Mapping[str, Union[int, float]]]


@dataclass
class Level:
    """One nested subnetwork.

    Attributes:
        index: position in ``ElasticModel.levels`` (smallest first).
        width: the uniform width multiplier, or ``None`` for a per-group level.
        channels: kept channels per elastic group.
        macs, params: counted by ``torch_pruning.utils.count_ops_and_params`` on the export
            (batch 1).
        latency_ms: median forward time measured on the current device, once asked for.
    """

    index: int
    width: Optional[float]
    channels: dict[str, int]
    macs: Optional[int] = None
    params: Optional[int] = None
    latency_ms: Optional[float] = None


def _check_widths(widths: Sequence[float]) -> list[float]:
    widths = list(widths)
    if not widths:
        raise ValueError("widths must not be empty; give width multipliers in (0, 1], e.g. (0.25, 0.5, 1.0)")
    for w in widths:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 < float(w) <= 1.0:
            raise ValueError(f"width {w!r} is outside (0, 1]; widths are fractions of the full channel count")
    for a, b in zip(widths, widths[1:]):
        if not b > a:
            raise ValueError(f"widths must be strictly increasing (smallest level first), got {widths}")
    return [float(w) for w in widths]


def _channels_for(size: int, value: Union[int, float], round_to: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: width {value!r} must be a fraction in (0, 1] or a channel count")
    if isinstance(value, float) or value == 1:
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{where}: width {value!r} is outside (0, 1]")
        k = int(math.floor(float(value) * size / round_to + 0.5)) * round_to
    else:
        if not 1 <= value <= size:
            raise ValueError(f"{where}: {value} channels requested, the group has 1..{size}")
        k = int(value)
    return max(min(k, size), min(round_to, size), 1)


def _saved_channels(channels: Mapping[str, int]) -> dict[str, Union[int, float]]:
    """Saved channel counts as a ``levels`` entry: a count of 1 would read as width 1 (full), so it
    becomes the smallest positive fraction, which keeps exactly one channel."""
    return {g: (sys.float_info.min if k == 1 else k) for g, k in channels.items()}


def _example_batch(shape: Sequence[int], device: torch.device, batch: int = 1) -> torch.Tensor:
    return torch.zeros((batch, *shape[1:]), device=device)


class ElasticModel(nn.Module):
    """Wraps a CNN so that it holds nested levels of several widths, switchable at runtime.

    Args:
        model: any CNN torch-pruning can trace; it is modified in place (channels reordered,
            Conv/Linear/BatchNorm modules switched to their sliced forms) and owned by the wrapper.
        example_inputs: an input batch for tracing (its shape is remembered for MAC counting).
        widths: uniform width multipliers in (0, 1], strictly increasing; one level each.
        levels: instead of ``widths``, one ``{group: fraction or channel count}`` dict per level
            (groups not named stay at full width); must be nested.
        importance: channel ranking: ``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"``, ``"fpgm"``,
            ``"lamp"``, ``"random"`` or a callable on a torch-pruning group.
        ignored_layers: module paths (or modules) whose output channels never shrink; the
            classifier (any group feeding the model output) is never shrunk anyway.
        reorder: rank and reorder channels (``False`` when the weights are already ordered, e.g.
            when loading a checkpoint).
        bn: ``"per_level"`` (one set of BatchNorm statistics per level, default) or ``"shared"``
            (one set; call :meth:`calibrate_bn` after switching).
        round_to: channel counts of a level are rounded to a multiple of this.
        data: batches ``(x, y)`` for gradient-based importance (``"taylor"``).
        loss_fn: loss for gradient-based importance (cross-entropy by default).

    Example:
        >>> em = ElasticModel(create_model("resnet20", in_channels=1), torch.randn(1, 1, 28, 28))
        >>> for lv in em.levels: print(lv.width, lv.macs, lv.params)
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        *,
        levels: Optional[Sequence[Mapping[str, Union[int, float]]]] = None,
        importance: Union[str, ImportanceFn] = "l1",
        ignored_layers: Iterable[Union[str, nn.Module]] = (),
        reorder: bool = True,
        bn: str = "per_level",
        round_to: int = 1,
        data: Optional[Iterable] = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if any(_slicing.is_sliced(m) for m in model.modules()):
            raise ValueError("model is already inside an ElasticModel; wrap the original model once")
        if bn not in BN_MODES:
            raise ValueError(f"bn={bn!r} is not supported; use one of {BN_MODES}")
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
            raise ValueError("example_inputs must be a batched tensor, e.g. torch.randn(1, 3, 32, 32)")
        if int(round_to) < 1:
            raise ValueError(f"round_to={round_to!r} must be >= 1")
        self.model = model
        self.example_shape = tuple(example_inputs.shape)
        self.bn_mode = bn
        self.round_to = int(round_to)
        self.ignored_layers = self._ignored_names(model, ignored_layers)
        self.graph: ChannelGraph = build_channel_graph(model, example_inputs, self.ignored_layers)
        if not self.graph.groups:
            raise ValueError(
                f"{type(model).__name__} has no elastic channel group (all groups feed the output or are "
                "ignored); nothing can shrink"
            )
        self.levels_: list[Level] = self._make_levels(widths, levels)
        if reorder:
            self.reorder(importance, data=data, loss_fn=loss_fn)
        self._state = _slicing.LevelState()
        self._convert()
        self.set_level(len(self.levels_) - 1)
        self._check_smallest_level(example_inputs)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _ignored_names(model: nn.Module, ignored: Iterable[Union[str, nn.Module]]) -> list[str]:
        names = {m: n for n, m in model.named_modules()}
        return [names.get(x, x) if isinstance(x, nn.Module) else x for x in ignored]

    def _make_levels(self, widths: Sequence[float], levels: Optional[Sequence[Mapping]]) -> list[Level]:
        out: list[Level] = []
        if levels is not None:
            if not levels:
                raise ValueError("levels must not be empty")
            for i, spec in enumerate(levels):
                out.append(Level(i, None, self._channels_from_dict(spec, f"levels[{i}]")))
            for i in range(1, len(out)):
                for g, k in out[i].channels.items():
                    if k < out[i - 1].channels[g]:
                        raise ValueError(
                            f"levels must be nested: levels[{i}] keeps {k} channels of group {g!r}, "
                            f"fewer than levels[{i - 1}] ({out[i - 1].channels[g]})"
                        )
            return out
        for i, w in enumerate(_check_widths(widths)):
            chans = {g.name: _channels_for(g.size, w, self.round_to, f"widths[{i}]") for g in self.graph.groups}
            out.append(Level(i, w, chans))
        return out

    def _channels_from_dict(self, spec: Mapping[str, Union[int, float]], where: str) -> dict[str, int]:
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a dict {{group: width}}, got {type(spec).__name__}")
        names = set(self.graph.names)
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise ValueError(f"{where}: unknown channel group(s) {unknown}; groups of this model: {self.graph.names}")
        return {
            g.name: _channels_for(g.size, spec[g.name], self.round_to, f"{where}[{g.name!r}]") if g.name in spec else g.size
            for g in self.graph.groups
        }

    def reorder(
        self,
        importance: Union[str, ImportanceFn] = "l1",
        *,
        data: Optional[Iterable] = None,
        loss_fn: Callable = F.cross_entropy,
        prefix: Optional[Mapping[str, int]] = None,
    ) -> dict[str, torch.Tensor]:
        """Rank channels and move the important ones first (function-preserving).

        With ``prefix={group: k}`` only the first ``k`` channels of each group are reordered, so
        the channels of larger levels outside the prefix keep their places. Per-level BatchNorm
        statistics move with their channels.
        """
        needs_grad = isinstance(importance, str) and importance in GRADIENT_IMPORTANCES
        if needs_grad:
            if data is None:
                raise ValueError(f"importance {importance!r} needs gradients: pass data=<batches of (x, y)>")
            self._accumulate_grads(data, loss_fn)
        try:
            scores = rank_channels(self.graph, importance)
            return reorder_channels(self.model, self.graph, scores, prefix)
        finally:
            if needs_grad:
                self.model.zero_grad(set_to_none=True)

    def _accumulate_grads(self, data: Iterable, loss_fn: Callable, max_batches: int = 8) -> None:
        device = next(self.model.parameters()).device
        self.model.zero_grad(set_to_none=True)
        # ranking must not change the function: train-mode forwards would move BN running statistics
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            with torch.enable_grad():
                for i, (x, y) in enumerate(data):
                    if i >= max_batches:
                        break
                    loss_fn(self.model(x.to(device)), y.to(device)).backward()
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    def _convert(self) -> None:
        modules = {name for name, _ in self.graph.dims}
        # BatchNorms outside elastic groups (after an ignored or output-coupled layer) still see
        # level-dependent inputs: they get per-level statistics too, at full width
        modules |= {
            name
            for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
        }
        modules = sorted(modules)
        rows = len(self.levels_) + 1 if self.bn_mode == "per_level" else 1
        for name in modules:
            _slicing.make_sliced(self.model.get_submodule(name), self._state, rows)
        self._sliced_names = modules
        for name in modules:
            self.model.get_submodule(name)._ne_specs = [None] * (len(self.levels_) + 1)
        for level in self.levels_:
            self._set_spec(level.index, level.channels)
        self._set_spec(len(self.levels_), self.levels_[-1].channels)  # the slot for ad-hoc widths

    def _set_spec(self, slot: int, channels: Mapping[str, int]) -> None:
        with torch.inference_mode(False):  # selectors made under inference mode could not train later
            keep = keep_indices(self.graph, channels)
            for name in self._sliced_names:
                module = self.model.get_submodule(name)
                device = module.weight.device if module.weight is not None else module.level_running_mean.device
                sels = []
                for dim in ("out", "in"):
                    sel = keep.get((name, dim))
                    if sel is not None and not isinstance(sel, int):
                        sel = sel.to(device)
                    sels.append(None if isinstance(sel, int) and sel == self.graph.dims.get((name, dim)) else sel)
                module._ne_specs[slot] = tuple(sels)

    def _check_smallest_level(self, example_inputs: torch.Tensor) -> None:
        was_training = self.model.training
        try:
            with self.use_level(0), torch.no_grad():
                self.model.eval()
                self.model(example_inputs.to(self._device()))
        except Exception as exc:
            raise ValueError(
                f"the sliced forward of the smallest level fails ({type(exc).__name__}: {exc}); some code in "
                f"{type(self.model).__name__}.forward depends on a fixed channel count; keep those channels at "
                "full width with ignored_layers=[<module path>]"
            ) from exc
        finally:
            self.model.train(was_training)

    def _apply(self, fn, *args, **kwargs):  # keep index selectors on the parameters' device
        super()._apply(fn, *args, **kwargs)
        for name in getattr(self, "_sliced_names", ()):
            module = self.model.get_submodule(name)
            ref = module.weight if module.weight is not None else module.level_running_mean
            module._ne_specs = [
                tuple(s.to(ref.device) if isinstance(s, torch.Tensor) else s for s in spec) for spec in module._ne_specs
            ]
        return self

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ levels
    @property
    def num_levels(self) -> int:
        return len(self.levels_)

    @property
    def levels(self) -> list[Level]:
        """The levels, smallest first, with MACs and params counted on first access."""
        for level in self.levels_:
            if level.macs is None:
                level.macs, level.params = self.count(level.index)
        return self.levels_

    @property
    def current_level(self) -> Union[int, dict[str, int]]:
        """The active level index, or the channel dict of an ad-hoc level."""
        if self._state.index == len(self.levels_):
            return dict(self._custom_channels)
        return self._state.index

    def channels_of(self, level: LevelLike) -> dict[str, int]:
        """Kept channels per group for a level index, a uniform width or a ``{group: width}`` dict."""
        if isinstance(level, bool):
            raise ValueError(f"level {level!r} must be an index, a width or a dict")
        if isinstance(level, int):
            return dict(self.levels_[self._index(level)].channels)
        if isinstance(level, float):
            return {g.name: _channels_for(g.size, level, self.round_to, "width") for g in self.graph.groups}
        return self._channels_from_dict(level, "level")

    def _index(self, level: int) -> int:
        n = len(self.levels_)
        if not -n <= level < n:
            raise ValueError(f"level {level} does not exist; this model has levels 0..{n - 1} (or -1 for the largest)")
        return level % n

    def set_level(self, level: LevelLike) -> None:
        """Activate a level: an index (``-1`` = largest), a width in (0, 1] or a ``{group: width}`` dict.

        An index switches in microseconds (one integer is written). A width or dict activates an
        ad-hoc level on the shared weights; its BatchNorm statistics start as a copy of the
        smallest defined level containing it: call :meth:`calibrate_bn` for exact statistics.
        """
        if isinstance(level, int) and not isinstance(level, bool):
            i = self._index(level)
            self._state.index = i
            self._state.bn_row = i if self.bn_mode == "per_level" else 0
            return
        channels = self.channels_of(level)
        slot = len(self.levels_)
        if getattr(self, "_custom_channels", None) != channels:
            self._set_spec(slot, channels)
            self._custom_channels = channels
            if self.bn_mode == "per_level":
                self._copy_bn_row(self._containing_level(channels), slot)
        self._state.index = slot
        self._state.bn_row = slot if self.bn_mode == "per_level" else 0

    def _containing_level(self, channels: Mapping[str, int]) -> int:
        for level in self.levels_:
            if all(level.channels[g] >= k for g, k in channels.items()):
                return level.index
        return len(self.levels_) - 1

    def _bn_modules(self) -> list[_slicing.SlicedBatchNorm]:
        return [m for m in self.model.modules() if isinstance(m, _slicing.SlicedBatchNorm)]

    def _copy_bn_row(self, src: int, dst: int) -> None:
        with torch.no_grad():
            for m in self._bn_modules():
                m.level_running_mean[dst].copy_(m.level_running_mean[src])
                m.level_running_var[dst].copy_(m.level_running_var[src])
                m.level_num_batches_tracked[dst].copy_(m.level_num_batches_tracked[src])

    @contextlib.contextmanager
    def use_level(self, level: LevelLike) -> Iterator["ElasticModel"]:
        """Temporarily activate a level; the previous one is restored on exit."""
        previous = (self._state.index, self._state.bn_row)
        slot = len(self.levels_)
        # an ad-hoc level inside an ad-hoc level reuses its slot: keep what is needed to put it back
        custom = getattr(self, "_custom_channels", None) if previous[0] == slot else None
        rows = None
        if custom is not None and self.bn_mode == "per_level":
            rows = [(m.level_running_mean[slot].clone(), m.level_running_var[slot].clone(),
                     m.level_num_batches_tracked[slot].clone()) for m in self._bn_modules()]
        self.set_level(level)
        try:
            yield self
        finally:
            if custom is not None and self._custom_channels != custom:
                self._set_spec(slot, custom)
                self._custom_channels = custom
                with torch.no_grad():
                    for m, (mean, var, count) in zip(self._bn_modules(), rows or ()):
                        m.level_running_mean[slot].copy_(mean)
                        m.level_running_var[slot].copy_(var)
                        m.level_num_batches_tracked[slot].copy_(count)
            self._state.index, self._state.bn_row = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def parameter_masks(self, level: LevelLike) -> dict[str, torch.Tensor]:
        """Boolean masks of the entries of every parameter that a level uses (``{name: mask}``).

        Parameters outside sliced modules are used by every level (all ``True``). Used to train
        only the channels a level adds on top of a smaller one, and to check nesting.
        """
        channels = self.channels_of(level) if not isinstance(level, Mapping) else self._channels_from_dict(level, "level")
        keep = keep_indices(self.graph, channels)
        masks: dict[str, torch.Tensor] = {}
        for mod_name, module in self.model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                mask = torch.ones_like(p, dtype=torch.bool)
                for axis, dim in ((0, "out"), (1, "in")):
                    sel = keep.get((mod_name, dim))
                    if sel is None or p.dim() <= axis or (dim == "in" and p.dim() < 2):
                        continue
                    keep_axis = torch.zeros(p.shape[axis], dtype=torch.bool, device=p.device)
                    if isinstance(sel, int):
                        keep_axis[:sel] = True
                    else:
                        keep_axis[sel.to(p.device)] = True
                    shape = [1] * p.dim()
                    shape[axis] = -1
                    mask &= keep_axis.view(shape)
                masks[full] = mask
        return masks

    # ------------------------------------------------------------------ BatchNorm
    @torch.no_grad()
    def calibrate_bn(
        self, data: Iterable, level: Optional[LevelLike] = None, num_batches: Optional[int] = None
    ) -> None:
        """Recompute the BatchNorm statistics of a level (default: the active one) from data.

        Statistics are reset and re-estimated as an exact average over ``num_batches`` batches
        (all by default) with only BatchNorm layers in training mode; weights do not change.
        """
        context = self.use_level(level) if level is not None else contextlib.nullcontext()
        bns = self._bn_modules()
        modes = {m: m.training for m in self.model.modules()}
        momenta = {m: m.momentum for m in bns}
        device = self._device()
        with context:
            row = self._state.bn_row
            for m in bns:
                m.level_running_mean[row].zero_()
                m.level_running_var[row].fill_(1.0)
                m.level_num_batches_tracked[row].zero_()
                m.momentum = None
            self.model.eval()
            for m in bns:
                m.train()
            try:
                seen = 0
                for batch in data:
                    if num_batches is not None and seen >= num_batches:
                        break
                    x = batch[0] if isinstance(batch, (list, tuple)) else batch
                    self.model(x.to(device))
                    seen += 1
                if seen == 0:
                    raise ValueError("calibrate_bn got no batches; pass a non-empty loader")
            finally:
                for m, mode in modes.items():
                    m.train(mode)
                for m, mom in momenta.items():
                    m.momentum = mom

    # ------------------------------------------------------------------ export and cost
    def export(self, level: Optional[LevelLike] = None) -> nn.Module:
        """A standalone copy of a level (default: the active one), physically pruned with torch-pruning.

        The copy uses the model's own module classes (no nni_elastic layers), holds the level's
        BatchNorm statistics, is in eval mode, scriptable and ONNX-exportable, and computes the
        same outputs as the sliced level.
        """
        if level is None:
            slot = self._state.index
            channels = self._custom_channels if slot == len(self.levels_) else self.levels_[slot].channels
            row = self._state.bn_row
        elif isinstance(level, int) and not isinstance(level, bool):
            slot = self._index(level)
            channels, row = self.levels_[slot].channels, (slot if self.bn_mode == "per_level" else 0)
        else:
            with self.use_level(level):
                return self.export()
        # torch-pruning traces through autograd, and the copy must hold normal (not inference) tensors
        with torch.inference_mode(False), torch.enable_grad():
            plain = copy.deepcopy(self.model)
            for m in plain.modules():
                _slicing.make_plain(m, row)
            if hasattr(plain, "nni_elastic_arch"):
                plain.nni_elastic_arch = copy.deepcopy(plain.nni_elastic_arch)
            example = _example_batch(self.example_shape, self._device())
            dg = tp.DependencyGraph().build_dependency(plain, example_inputs=example, verbose=False)
            for g in self.graph.groups:
                k = channels[g.name]
                if k < g.size:
                    root = plain.get_submodule(g.name)
                    pruner = dg.get_pruner_of_module(root)
                    dg.get_pruning_group(root, pruner.prune_out_channels, list(range(k, g.size))).prune()
        plain.nni_elastic_channels = dict(channels)
        return plain.eval()

    def count(self, level: Optional[LevelLike] = None) -> tuple[int, int]:
        """(MACs, params) of a level at batch 1, counted by torch-pruning on its export."""
        exported = self.export(level)
        macs, params = tp.utils.count_ops_and_params(exported, _example_batch(self.example_shape, self._device()))
        return int(macs), int(params)

    @torch.inference_mode()
    def measure_latency(
        self,
        level: Optional[LevelLike] = None,
        *,
        batch_size: int = 1,
        repeats: int = 30,
        warmup: int = 5,
        exported: bool = False,
    ) -> float:
        """Median forward time in milliseconds of a level on the model's current device.

        Args:
            level: the level (default: the active one).
            batch_size: batch of the timed input.
            repeats, warmup: timed and untimed runs.
            exported: time the physically pruned export instead of the sliced forward.
        """
        device = self._device()
        x = _example_batch(self.example_shape, device, batch_size)
        context = self.use_level(level) if level is not None else contextlib.nullcontext()
        with context:
            net = self.export() if exported else self.model
            was_training = net.training
            net.eval()
            try:
                return _median_ms(lambda: net(x), repeats, warmup, device)
            finally:
                net.train(was_training)

    def measure_levels(self, batch_size: int = 1, repeats: int = 30) -> list[Level]:
        """Measure and store ``latency_ms`` of every level on the current device."""
        for level in self.levels:
            level.latency_ms = self.measure_latency(level.index, batch_size=batch_size, repeats=repeats)
        return self.levels_

    def pick_level(
        self,
        *,
        max_macs: Optional[float] = None,
        max_params: Optional[float] = None,
        max_latency_ms: Optional[float] = None,
        batch_size: int = 1,
    ) -> int:
        """Index of the largest level that fits every given budget (adapting to the hardware at hand).

        ``max_macs``/``max_params`` in (0, 1] are fractions of the largest level's count, larger
        values are absolute counts. ``max_latency_ms`` is checked against latency measured now on
        the current device (measured once, then cached in ``Level.latency_ms``).
        """
        if max_macs is None and max_params is None and max_latency_ms is None:
            raise ValueError("pick_level needs at least one budget: max_macs, max_params or max_latency_ms")
        levels = self.levels
        full = levels[-1]

        def limit(value: Optional[float], total: int, name: str) -> float:
            if value is None:
                return math.inf
            if value <= 0:
                raise ValueError(f"{name}={value!r} must be positive")
            return value * total if value <= 1 else value

        macs_cap, params_cap = limit(max_macs, full.macs, "max_macs"), limit(max_params, full.params, "max_params")
        if max_latency_ms is not None:
            if max_latency_ms <= 0:
                raise ValueError(f"max_latency_ms={max_latency_ms!r} must be positive")
            for level in levels:
                if level.latency_ms is None:
                    level.latency_ms = self.measure_latency(level.index, batch_size=batch_size)
        fits = [
            lv.index
            for lv in levels
            if lv.macs <= macs_cap
            and lv.params <= params_cap
            and (max_latency_ms is None or lv.latency_ms <= max_latency_ms)
        ]
        if not fits:
            small = levels[0]
            raise ValueError(
                f"no level fits the budget (max_macs={max_macs}, max_params={max_params}, "
                f"max_latency_ms={max_latency_ms}); the smallest level has {small.macs} MACs, "
                f"{small.params} params, latency {small.latency_ms} ms"
            )
        return fits[-1]

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike, **metadata: Any) -> None:
        """Write the model, its levels and ``metadata`` atomically to ``path``.

        Models from ``nni_elastic.models.create_model`` are stored as weights + architecture and
        load with ``torch.load(weights_only=True)``; other models are also pickled
        whole (as bytes inside the file, which still loads with ``weights_only=True``).
        """
        arch = getattr(self.model, "nni_elastic_arch", None)
        payload: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "arch": copy.deepcopy(arch),
            "example_shape": list(self.example_shape),
            "bn": self.bn_mode,
            "round_to": self.round_to,
            "ignored_layers": list(self.ignored_layers),
            "levels": [asdict(lv) for lv in self.levels_],
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "metadata": metadata,
        }
        if arch is None:
            plain = copy.deepcopy(self.model).cpu()
            for m in plain.modules():
                _slicing.make_plain(m, 0)
            # pickled into bytes, so the file itself still loads with ``weights_only=True``
            # (``load(path, model=...)`` never unpickles it)
            buffer = io.BytesIO()
            torch.save(plain, buffer)
            payload["module"] = buffer.getvalue()
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: PathLike, *, model: Optional[nn.Module] = None, map_location: Any = "cpu") -> "ElasticModel":
        """Load a checkpoint written by :meth:`save`.

        Args:
            path: the checkpoint file.
            model: a freshly built instance of the same architecture (for models not built by
                ``create_model``); lets the file be read with ``weights_only=True``.
            map_location: passed to ``torch.load``.
        """
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"elastic checkpoint {str(path)!r} does not exist")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # a whole pickled custom model needs the full unpickler
            if model is not None:
                raise ValueError(f"{path}: cannot be read with weights_only=True: {exc}") from exc
            logger.info("%s holds a pickled model; loading with weights_only=False", path)
            payload = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not an nni-elastic checkpoint (no {FORMAT!r} format tag)")
        if payload["version"] > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {payload['version']}; this nni-elastic reads up to {FORMAT_VERSION}")
        if model is None:
            if payload.get("arch") is not None:
                from .models import create_model

                arch = payload["arch"]
                model = create_model(arch["name"], **arch["kwargs"])
            elif "module" in payload:
                model = payload["module"]
                if isinstance(model, bytes):
                    logger.info("%s: unpickling the stored model (load only files you trust)", path)
                    model = torch.load(io.BytesIO(model), map_location=map_location, weights_only=False)
            else:
                raise ValueError(f"{path}: no architecture recorded; pass model=<a new instance of the architecture>")
        model = model.to(map_location) if map_location is not None and not callable(map_location) else model
        saved = payload["levels"]
        em = cls(
            model,
            torch.zeros(payload["example_shape"]),
            levels=[_saved_channels(lv["channels"]) for lv in saved],
            reorder=False,
            bn=payload["bn"],
            round_to=payload.get("round_to", 1),
            ignored_layers=payload["ignored_layers"],
        )
        em.model.load_state_dict(payload["state_dict"])
        for level, lv in zip(em.levels_, saved):
            level.width, level.macs, level.params = lv["width"], lv["macs"], lv["params"]
        em.metadata = payload.get("metadata", {})
        return em

    def describe(self) -> list[dict[str, Any]]:
        """One row per level: index, width, MACs, params, MAC ratio to the largest level, latency."""
        levels = self.levels
        full = levels[-1].macs or 1
        return [
            {
                "level": lv.index,
                "width": lv.width,
                "macs": lv.macs,
                "params": lv.params,
                "macs_ratio": lv.macs / full,
                "latency_ms": lv.latency_ms,
            }
            for lv in levels
        ]

    def extra_repr(self) -> str:
        return f"levels={len(self.levels_)}, groups={len(self.graph.groups)}, bn={self.bn_mode!r}"


def _median_ms(run: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
