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
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _slicing
from .checkpoint import PathLike, saved_channels
from .measure import budget as _budget, count_ops as _count_ops, latency_ms as _latency_ms
from .graph import (
    GRADIENT_IMPORTANCES,
    UNSUPPORTED_MODES,
    ChannelGraph,
    ChannelGroup,
    UnsupportedModuleError,
    _warn_kept,
    accumulate_gradients,
    apply_permutations,
    ImportanceFn,
    build_channel_graph,
    keep_indices,
    rank_channels,
    remap,
    reorder_channels,
    trace,
    unsupported_error,
)

__all__ = ["ElasticModel", "Level", "BN_MODES", "LATENCY_FORMS", "check_widths", "latency_key"]

logger = logging.getLogger(__name__)

BN_MODES = ("per_level", "shared")
#: how a level runs when its latency is measured: the sliced forward, the prepared sliced forward
#: (``prepare_inference``), the plain export, or the deploy export (``export(deploy=True)``)
LATENCY_FORMS = ("sliced", "prepared", "export", "deploy")
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
        macs, params: counted by torch-pruning (:func:`nni_elastic.measure.count_ops`) on the export
            (batch 1).
        latency_ms: the latest median forward time measured on the current device.
        latency: every measurement, keyed ``"<device>/b<batch>/<form>"`` (see
            :meth:`ElasticModel.measure_latency`); saved with the model.
    """

    index: int
    width: Optional[float]
    channels: dict[str, int]
    macs: Optional[int] = None
    params: Optional[int] = None
    latency_ms: Optional[float] = None
    latency: dict[str, float] = field(default_factory=dict)


def check_widths(widths: Sequence[float]) -> list[float]:
    """Validate uniform width multipliers: non-empty, each in (0, 1], strictly increasing."""
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
    # a float is a fraction of the group, an int a channel count: 1 is one channel (what
    # channels_of returns gives back the same level), the whole group is 1.0
    if isinstance(value, float):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{where}: width {value!r} is outside (0, 1]")
        k = int(math.floor(float(value) * size / round_to + 0.5)) * round_to
    else:
        if not 1 <= value <= size:
            raise ValueError(f"{where}: {value} channels requested, the group has 1..{size}")
        k = int(math.ceil(int(value) / round_to)) * round_to  # grouped layers need whole blocks
    return max(min(k, size), min(round_to, size), 1)


def _example_batch(
    shape: Sequence[int], device: torch.device, batch: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return torch.zeros((batch, *shape[1:]), device=device, dtype=dtype)


class ElasticModel(nn.Module):
    """Wraps a CNN so that it holds nested levels of several widths, switchable at runtime.

    Args:
        model: any CNN torch-pruning can trace; it is modified in place (channels reordered,
            sliced modules switched to generated subclasses of their own classes that keep their
            forward) and owned by the wrapper.
        example_inputs: an input batch for tracing (its shape is remembered for MAC counting).
        widths: uniform width multipliers in (0, 1], strictly increasing; one level each.
        levels: instead of ``widths``, one ``{group: fraction or channel count}`` dict per level
            (a float is a fraction, an int a channel count: 1 is one channel; groups not named
            stay at full width); must be nested.
        importance: channel ranking: ``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"``, ``"hessian"``,
            ``"fpgm"``, ``"lamp"``, ``"random"`` or a callable on a torch-pruning group.
        ignored_layers: module paths (or modules) whose output channels never shrink; the
            classifier (any group feeding the model output) is never shrunk anyway.
        reorder: rank and reorder channels (``False`` when the weights are already ordered, e.g.
            when loading a checkpoint).
        bn: ``"per_level"`` (one set of BatchNorm statistics per level, default) or ``"shared"``
            (one set; call :meth:`calibrate_bn` after switching).
        round_to: channel counts of a level are rounded to a multiple of this (and of the block
            count of groups split by grouped convolutions or GroupNorm).
        unsupported: ``"error"`` (default) refuses a group that cannot be sliced with one
            :class:`UnsupportedModuleError` naming it; ``"keep"`` keeps such groups at full width
            and warns which and why, so every model torch-pruning traces gets levels.
        verify: check on construction that every level equals its export (see :meth:`verify`).
        data: batches ``(x, y)`` for gradient-based importance (``"taylor"``, ``"hessian"``).
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
        unsupported: str = "error",
        verify: bool = True,
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
        if unsupported not in UNSUPPORTED_MODES:
            raise ValueError(f"unsupported={unsupported!r} is not supported; use one of {UNSUPPORTED_MODES}")
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
            raise ValueError("example_inputs must be a batched tensor, e.g. torch.randn(1, 3, 32, 32)")
        if int(round_to) < 1:
            raise ValueError(f"round_to={round_to!r} must be >= 1")
        self.model = model
        self.example_shape = tuple(example_inputs.shape)
        self.bn_mode = bn
        self.round_to = int(round_to)
        self.unsupported = unsupported
        self.ignored_layers = self._ignored_names(model, ignored_layers)
        self.graph: ChannelGraph = build_channel_graph(model, example_inputs, self.ignored_layers, unsupported)
        self._require_groups()
        self.levels_: list[Level] = self._make_levels(widths, levels)
        self._state = _slicing.LevelState()
        if reorder:
            self.reorder(importance, data=data, loss_fn=loss_fn)
        self._convert()
        self.set_level(len(self.levels_) - 1)
        if verify:
            self.verify()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _ignored_names(model: nn.Module, ignored: Iterable[Union[str, nn.Module]]) -> list[str]:
        names = {m: n for n, m in model.named_modules()}
        return [names.get(x, x) if isinstance(x, nn.Module) else x for x in ignored]

    def _require_groups(self) -> None:
        if not self.graph.groups:
            why = "".join(f"; {root!r}: {reason}" for root, reason in self.graph.problems.items())
            raise ValueError(
                f"{type(self.model).__name__} has no elastic channel group (all groups feed the output, are "
                f"ignored or cannot be sliced{why}); nothing can shrink"
            )

    def _round(self, group: ChannelGroup) -> int:
        return math.lcm(self.round_to, group.step)

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
        for i, w in enumerate(check_widths(widths)):
            chans = {g.name: _channels_for(g.size, w, self._round(g), f"widths[{i}]") for g in self.graph.groups}
            out.append(Level(i, w, chans))
        return out

    def _channels_from_dict(self, spec: Mapping[str, Union[int, float]], where: str) -> dict[str, int]:
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a dict {{group: width}}, got {type(spec).__name__}")
        names = set(self.graph.names) | set(self.graph.fixed)
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise ValueError(f"{where}: unknown channel group(s) {unknown}; groups of this model: {self.graph.names}")
        return {
            g.name: _channels_for(g.size, spec[g.name], self._round(g), f"{where}[{g.name!r}]") if g.name in spec else g.size
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
        """Rank channels and move the important ones first (function-preserving, and checked).

        With ``prefix={group: k}`` only the channels a level of ``k`` keeps are reordered, so
        the channels of larger levels outside the prefix keep their places, and they are scored on
        that level alone (its physically pruned export): a weight of a channel outside the level
        (e.g. of a consumer's output channel the level drops) does not count, and gradient-based
        criteria use the gradients of the level's forward (its BatchNorm statistics, the model's
        train/eval mode). Per-level BatchNorm
        statistics move with their channels. The full model's outputs are compared before and
        after on a fixed batch; a group whose reorder changes them (an op torch-pruning traces as
        a plain channel map, such as a channel shuffle) is put back and refused, or kept at full
        width with ``unsupported="keep"``.
        """
        needs_grad = isinstance(importance, str) and importance in GRADIENT_IMPORTANCES
        if needs_grad and data is None:
            raise ValueError(f"importance {importance!r} needs gradients: pass data=<batches of (x, y)>")
        failures: dict[str, str] = {}
        kept = None if prefix is None else {g.name: min(int(prefix.get(g.name, g.size)), g.size) for g in self.graph.groups}
        if kept is not None and any(kept[g.name] < g.size for g in self.graph.groups):
            scores = self._level_scores(importance, kept, data, loss_fn, failures)
        else:
            scores = self.channel_scores(importance, data=data, loss_fn=loss_fn, failures=failures)
        if failures:
            if self.unsupported == "error":
                raise unsupported_error(failures)
            for name, reason in failures.items():
                self._demote(name, reason)
        with self._full_eval():
            before = self._probe()
            perms = reorder_channels(self.model, self.graph, scores, prefix)
            if _close(self._probe(), before):
                return perms
            bad = self._bad_reorders(perms, before)
        if not bad:  # float32 noise only: the float64 comparison found every group exact
            return perms
        reasons = {name: self._reorder_reason(name) for name in bad}
        if self.unsupported == "error":
            raise unsupported_error(reasons)
        for name, reason in reasons.items():
            self._demote(name, reason)
        return {k: v for k, v in perms.items() if k not in bad}

    def channel_scores(
        self,
        importance: Union[str, ImportanceFn] = "l1",
        *,
        data: Optional[Iterable] = None,
        loss_fn: Callable = F.cross_entropy,
        failures: Optional[dict[str, str]] = None,
    ) -> dict[str, torch.Tensor]:
        """``{group: scores}`` of every channel on the current weights (gradients from ``data`` where
        ``importance`` needs them; the model's weights, buffers and gradients are left as they were)."""
        needs_grad = isinstance(importance, str) and importance in GRADIENT_IMPORTANCES
        if needs_grad:
            if data is None:
                raise ValueError(f"importance {importance!r} needs gradients: pass data=<batches of (x, y)>")
            self._accumulate_grads(data, loss_fn, importance=importance)
        self._retrace_groups()
        try:
            return rank_channels(self.graph, importance, failures)
        finally:
            if needs_grad:
                self.model.zero_grad(set_to_none=True)

    def _level_scores(
        self,
        importance: Union[str, ImportanceFn],
        channels: Mapping[str, int],
        data: Optional[Iterable],
        loss_fn: Callable,
        failures: dict[str, str],
    ) -> dict[str, torch.Tensor]:
        """``{group: scores}`` (length ``size``) of the channels a level ``{group: k}`` keeps, scored on its export.

        Channel ``j`` of a group of the export is the ``j``-th smallest root channel the level keeps
        (torch-pruning removes the others and keeps the order). Channels outside the level score 0;
        a group the export's trace does not give back is left out (not reordered).
        """
        index = next((lv.index for lv in self.levels_ if lv.channels == dict(channels)), None)
        plain = self.export(index if index is not None else saved_channels(channels))
        plain.train(self.model.training)
        # the groups this model keeps at full width stay so in the export (no second warning)
        ignored = list(self.ignored_layers) + [r for r in self.graph.problems if r not in self.ignored_layers]
        example = _example_batch(self.example_shape, self._device(), dtype=_module_dtype(plain))
        sub = build_channel_graph(plain, example, ignored, "keep")
        needs_grad = isinstance(importance, str) and importance in GRADIENT_IMPORTANCES
        if needs_grad:
            accumulate_gradients(plain, data, loss_fn, importance)
        level_scores = rank_channels(sub, importance, failures)
        scores: dict[str, torch.Tensor] = {}
        for g in self.graph.groups:
            k = channels[g.name]
            s = level_scores.get(g.name)
            if s is None or s.numel() != k:
                if g.name not in failures:
                    logger.warning("channel group %r: not found in the export of level %s; its channels keep their "
                                   "order", g.name, dict(channels))
                continue
            full = torch.zeros(g.size)
            full[torch.tensor(sorted(g.order[:k]), dtype=torch.long)] = s
            scores[g.name] = full
        return scores

    def _retrace_groups(self) -> None:
        """Give groups without a torch-pruning group (in a deep copy) one on this model's modules."""
        missing = [g for g in self.graph.groups if g.tp_group is None]
        if not missing:
            return
        with self._full_eval():
            dg = trace(self.model, _example_batch(self.example_shape, self._device(), dtype=_module_dtype(self.model)))
        for g in missing:
            root = self.model.get_submodule(g.name)
            g.tp_group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(g.size)))

    def _reorder_reason(self, name: str) -> str:
        g = self.graph.group(name)
        ops = f" (its trace holds {', '.join(g.ops)} ops)" if g.ops else ""
        return (
            f"reordering channel group {name!r} changes the model's output{ops}: torch-pruning's channel mapping "
            f"between its members is not exact (a channel shuffle through view/transpose, or a split whose chunks "
            f"meet again through add/concat); members {sorted({m.module for m in g.members})[:6]}"
        )

    def _bad_reorders(self, perms: Mapping[str, torch.Tensor], before: torch.Tensor) -> list[str]:
        """Undo every reorder, then redo them one group at a time in float64: the groups that break the function."""
        inverse = {name: torch.argsort(p) for name, p in perms.items()}
        apply_permutations(self.model, self.graph, inverse)
        with _as_float64(self.model):
            reference = self._probe()
            bad = []
            for name, perm in perms.items():
                if torch.equal(perm, torch.arange(len(perm))):
                    continue
                apply_permutations(self.model, self.graph, {name: perm})
                if _close(self._probe(), reference, rtol=1e-9):
                    continue
                bad.append(name)
                apply_permutations(self.model, self.graph, {name: inverse[name]})
        return bad

    def _accumulate_grads(self, data: Iterable, loss_fn: Callable, max_batches: int = 8,
                          importance: str = "taylor") -> None:
        """Fill ``.grad`` as gradient importance ``importance`` reads it (:func:`~nni_elastic.graph.accumulate_gradients`)."""
        accumulate_gradients(self.model, data, loss_fn, importance, max_batches=max_batches)

    def _convert(self) -> None:
        modules = {name for name, _ in self.graph.dims}
        # BatchNorms outside elastic groups (after an ignored or output-coupled layer) still see
        # level-dependent inputs: they get per-level statistics too, at full width
        modules |= {name for name, m in self.model.named_modules() if _slicing.wants_level_rows(m)}
        modules = sorted(modules)
        rows = len(self.levels_) + 1 if self.bn_mode == "per_level" else 1
        for name in modules:
            _slicing.make_sliced(self.model.get_submodule(name), self._state, len(self.levels_) + 1, rows)
        self._sliced_names = modules
        self._set_all_specs()

    def _set_all_specs(self) -> None:
        for level in self.levels_:
            self._set_spec(level.index, level.channels)
        self._set_spec(len(self.levels_), getattr(self, "_custom_channels", None) or self.levels_[-1].channels)

    def _set_spec(self, slot: int, channels: Mapping[str, int]) -> None:
        for name, spec in self._specs(channels).items():
            module = self.model.get_submodule(name)
            _slicing.set_specs(module, slot, spec)
        self._drop_forms(slot)  # a prepared inference form of the old spec is void

    def _specs(self, channels: Mapping[str, int]) -> dict[str, _slicing.SliceSpec]:
        """How every sliced module runs at a level ``{group: k}``."""
        with torch.inference_mode(False):  # selectors made under inference mode could not train later
            keep = keep_indices(self.graph, channels)
            by_module: dict[str, list[tuple[str, Any]]] = {}
            for (name, dim), sel in keep.items():
                by_module.setdefault(name, []).append((dim, sel))
            specs = {}
            for name in self._sliced_names:
                module = self.model.get_submodule(name)
                device = _module_device(module)
                tensors: dict[str, list[tuple[int, Any]]] = {}
                attrs: dict[str, Any] = {}
                stats = None
                for dim, sel in by_module.get(name, ()):
                    full = self.graph.dims[(name, dim)]
                    if isinstance(sel, int) and sel == full:
                        continue
                    count = sel if isinstance(sel, int) else int(sel.numel())
                    if not isinstance(sel, int):
                        sel = sel.to(device)
                    if dim.startswith("param:"):
                        tensors.setdefault(dim.split(":", 1)[1], []).append((self.graph.axes[(name, dim)], sel))
                        continue
                    blocks = _slicing.channel_blocks(module, dim)
                    for tname, axis in _slicing.channel_tensors(module, dim):
                        if dim == "in" and blocks > 1:  # grouped conv: each block keeps its first count/blocks inputs
                            tensors.setdefault(tname, []).append((axis, count // blocks))
                        else:
                            tensors.setdefault(tname, []).append((axis, sel))
                    if _slicing.has_level_rows(module):
                        stats = sel
                    attrs.update(_slicing.channel_attrs(module, dim, count))
                specs[name] = _slicing.SliceSpec(
                    tuple((t, tuple(sels)) for t, sels in tensors.items()), attrs, stats
                )
        return specs

    def _demote(self, name: str, reason: str) -> None:
        """Keep group ``name`` at full width from now on (logged and warned, as for ``unsupported="keep"``)."""
        _warn_kept({name: reason})
        self.graph.demote(name, reason)
        self._require_groups()
        for level in self.levels_:
            level.channels.pop(name, None)
            level.macs = level.params = None
        if getattr(self, "_custom_channels", None):
            self._custom_channels.pop(name, None)
        if getattr(self, "_sliced_names", None):
            self._set_all_specs()

    # ------------------------------------------------------------------ self-check
    def _probe_input(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.example_shape, generator=gen)
        return x.to(device=self._device(), dtype=_module_dtype(self.model))

    @torch.no_grad()
    def _probe(self, module: Optional[nn.Module] = None) -> torch.Tensor:
        out = (module if module is not None else self.model)(self._probe_input())
        return _first_tensor(out).detach()

    @contextlib.contextmanager
    def _full_eval(self) -> Iterator[None]:
        modes = {m: m.training for m in self.model.modules()}
        previous = (self._state.index, self._state.bn_row)
        self.model.eval()
        if getattr(self, "_sliced_names", None):
            self._state.index = len(self.levels_) - 1
            self._state.bn_row = self._state.index if self.bn_mode == "per_level" else 0
        try:
            yield
        finally:
            self._state.index, self._state.bn_row = previous
            for m, mode in modes.items():
                m.train(mode)

    def verify(self) -> None:
        """Check every level against its physically pruned export on a fixed batch (eval mode).

        A level that differs (beyond float32 noise, confirmed in float64) or whose forward fails
        means some group cannot be sliced as traced: the groups responsible are found one at a
        time and refused with :class:`UnsupportedModuleError` naming them, or kept at full width
        with ``unsupported="keep"``. Runs after wrapping; MACs and params are counted on the way.
        """
        while True:
            bad = self._failing_level()
            if bad is None:
                return
            level, error = bad
            culprits = self._culprits(level)
            if not culprits:
                raise UnsupportedModuleError(
                    f"level {level} of {type(self.model).__name__} differs from its export ({error}) and no single "
                    "channel group explains it; wrap with ignored_layers=[...] to keep suspect layers at full width"
                )
            reasons = {name: self._level_reason(name, error) for name in culprits}
            if self.unsupported == "error":
                raise unsupported_error(reasons)
            for name, reason in reasons.items():
                self._demote(name, reason)

    def _level_reason(self, name: str, error: str) -> str:
        g = self.graph.group(name)
        kinds = sorted({f"{m.module} ({_slicing.original_type(self.model.get_submodule(m.module)).__name__})"
                        for m in g.members})
        return (
            f"shrunk, it fails or differs from its export, torch-pruning's pruned copy ({error}; does some forward "
            f"depend on a fixed channel count?); members {kinds[:6]}"
        )

    def _failing_level(self) -> Optional[tuple[int, str]]:
        for level in self.levels_:
            error = self._compare_with_export(level.index, level)
            if error is not None:
                return level.index, error
        return None

    def _compare_with_export(self, which: Union[int, Mapping[str, int]], level: Optional[Level] = None) -> Optional[str]:
        """``None`` if a level (index or exact ``{group: k}``) equals its export on the probe batch, else what went wrong."""
        if not isinstance(which, int):
            which = saved_channels(which)  # exact counts: a count of 1 must not read as width 1.0
        try:
            with self._full_eval(), self.use_level(which):
                sliced = self._probe()
                exported = self.export()
                if level is not None and level.macs is None:
                    level.macs, level.params = _count_ops(exported, _example_batch(self.example_shape, self._device()))
                plain = self._probe(exported)
                if _close(sliced, plain):
                    return None
                with _as_float64(self.model), _as_float64(exported):
                    err = _rel_err(self._probe(), self._probe(exported))
                return None if err <= 1e-9 else f"max relative difference {err:.2e}"
        except UnsupportedModuleError:
            raise
        except Exception as exc:  # a forward or torch-pruning's pruning fails at this width
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def _culprits(self, level: int) -> list[str]:
        """The groups that, shrunk alone to ``level``'s width, make the level disagree with its export."""
        channels = self.levels_[level].channels
        shrunk = [g.name for g in self.graph.groups if channels[g.name] < g.size]
        full = {g.name: g.size for g in self.graph.groups}

        def fails(names: list[str]) -> bool:
            return self._compare_with_export({**full, **{n: channels[n] for n in names}}) is not None

        found: list[str] = []

        def search(names: list[str]) -> None:  # bisection: few exports when few groups fail
            if not names or not fails(names):
                return
            if len(names) == 1:
                found.append(names[0])
                return
            half = len(names) // 2
            search(names[:half])
            search(names[half:])

        search(shrunk)
        return found

    def _apply(self, fn, *args, **kwargs):  # keep index selectors on the parameters' device
        super()._apply(fn, *args, **kwargs)
        for name in getattr(self, "_sliced_names", ()):
            module = self.model.get_submodule(name)
            device = _module_device(module)
            module._ne_specs = [spec.to(device) for spec in module._ne_specs]
        self._drop_forms()  # prepared forms of the old device/dtype: rebuilt on use
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
        """Kept channels per group for a level index, a uniform width or a ``{group: width or count}`` dict.

        The result, given back as a level, is the same level (its ints are channel counts)."""
        if isinstance(level, bool):
            raise ValueError(f"level {level!r} must be an index, a width or a dict")
        if isinstance(level, int):
            return dict(self.levels_[self._index(level)].channels)
        if isinstance(level, float):
            return {g.name: _channels_for(g.size, level, self._round(g), "width") for g in self.graph.groups}
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

    # ------------------------------------------------------------------ adding levels
    def add_level(
        self,
        spec: Union[float, Mapping[str, Any], Any],
        *,
        data: Optional[Iterable] = None,
        batches: Optional[int] = None,
        index: Optional[int] = None,
    ) -> Level:
        """Insert one more nested level on the trained weights, with BatchNorm statistics of its own.

        No training: the level keeps a prefix of every group as the others do, its statistics
        row is calibrated on ``data`` (:meth:`calibrate_bn`), its MACs and params are counted, and
        it is checked against its export. Every other level computes bit-identical outputs before
        and after. So one trained model ships as many operating points as wanted, e.g. the
        results of a subnet search. The level is saved with the model (:meth:`save`).

        Args:
            spec: a uniform width in (0, 1]; a ``{group: fraction (float) or channel count
                (int)}`` dict (groups not named stay full); or a subnet search result: a dict with ``"channels"`` (exact
                counts per group, as the rows of :func:`~nni_elastic.subnet.evaluate_subnet` and of
                the Optuna and NNI subnet searches hold) or only ``"widths"`` (per-stage widths,
                :func:`~nni_elastic.stages.stage_level`), or an object with a ``channels`` dict
                (an NNI ``ElasticSubnet``).
            data: batches ``(x, y)`` or ``x`` for the BatchNorm statistics of the new level;
                without, they start as a copy of the next larger level's (approximate, as for an
                ad-hoc level). Refused with ``bn="shared"`` (one set of statistics for all levels).
            batches: calibrate on at most this many batches of ``data`` (default: all of them).
            index: the position the level must take (checked); by default, where it nests.

        Returns:
            The new :class:`Level`; levels stay sorted smallest first, so the indices of the
            larger levels grow by one.

        Raises:
            ValueError: the level is not nested between its neighbours (naming the group), it
                equals an existing level, or ``index`` is not where it nests.

        Example:
            >>> em.add_level(0.375, data=calib_batches)                     # between 0.25 and 0.5
            >>> em.add_level(search_subnets("elastic.pt", max_macs=0.3).best, data=calib_batches)
        """
        if data is not None and self.bn_mode != "per_level":
            raise ValueError("add_level(data=...) calibrates the new level's own BatchNorm statistics, but this model "
                             "has bn='shared' (one set for all levels): add it without data and call calibrate_bn "
                             "after switching levels")
        width, channels = self._spec_channels(spec)
        pos = self._nest_position(channels)
        if index is not None and index != pos:
            raise ValueError(f"index={index!r}: the new level nests at position {pos} (levels stay sorted smallest "
                             f"first); leave index out")
        level = Level(pos, width, channels)
        self._insert_slot(pos, channels)
        self.levels_.insert(pos, level)
        for i, lv in enumerate(self.levels_):
            lv.index = i
        try:
            if data is not None:
                self.calibrate_bn(data, level=pos, num_batches=batches)
            error = self._compare_with_export(pos, level)
            if error is not None:
                raise ValueError(f"the new level {saved_channels(channels)} differs from its export ({error}); some "
                                 "group cannot be sliced to these widths")
        except BaseException:
            self._remove_slot(pos)
            raise
        self._reprepare(pos)
        logger.info("added level %d: %s (%s MACs, %s params)", pos, channels, level.macs, level.params)
        return level

    def _spec_channels(self, spec: Any) -> tuple[Optional[float], dict[str, int]]:
        """(width, channels) of an ``add_level`` spec."""
        if isinstance(spec, float) or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 1):
            return float(spec), self.channels_of(float(spec))
        if not isinstance(spec, Mapping) and isinstance(getattr(spec, "channels", None), Mapping):
            spec = {"channels": spec.channels}
        if not isinstance(spec, Mapping):
            raise ValueError(f"add_level: {spec!r} is not a level; give a width in (0, 1], a {{group: width}} dict or "
                             "a subnet search result (a dict with 'channels' or 'widths')")
        if isinstance(spec.get("channels"), Mapping):
            # exact counts: a count of 1 must not read as width 1.0
            return None, self._channels_from_dict(saved_channels(spec["channels"]), "add_level: channels")
        if isinstance(spec.get("widths"), Mapping):
            from .stages import stage_level

            return None, self._channels_from_dict(stage_level(self, spec["widths"]), "add_level: widths")
        return None, self._channels_from_dict(spec, "add_level")

    def _nest_position(self, channels: Mapping[str, int]) -> int:
        """Where a level of ``channels`` goes so that every level keeps >= the smaller's and <= the larger's channels."""
        for lv in self.levels_:
            if lv.channels == channels:
                raise ValueError(f"add_level: level {lv.index} already keeps exactly these channels")
        # the levels inside the new one form a prefix of the (nested) levels
        pos = sum(all(lv.channels[g] <= k for g, k in channels.items()) for lv in self.levels_)
        if pos < len(self.levels_):
            larger = self.levels_[pos]
            more = [g for g, k in channels.items() if k > larger.channels[g]]
            if more:
                fewer = [g for g, k in channels.items() if k < larger.channels[g]]
                g, h = more[0], fewer[0]
                raise ValueError(
                    f"add_level: the new level is not nested with level {pos}: it keeps more channels of group {g!r} "
                    f"({channels[g]} > {larger.channels[g]}) but fewer of group {h!r} ({channels[h]} < "
                    f"{larger.channels[h]}); a level must keep >= the smaller level's and <= the larger level's "
                    f"channels in every group"
                )
        return pos

    def _insert_slot(self, pos: int, channels: Mapping[str, int]) -> None:
        """Make room for a level at ``pos``: its slice specs, a statistics row (a copy of the next larger
        level's), and every per-slot table (prepared forms, the active slot) shifted by one."""
        n = len(self.levels_)
        specs = self._specs(channels)
        for name in self._sliced_names:
            module = self.model.get_submodule(name)
            module._ne_specs.insert(pos, specs[name])
            if self.bn_mode == "per_level" and _slicing.has_level_rows(module):
                src = min(pos, n - 1)
                for buf in ("level_running_mean", "level_running_var", "level_num_batches_tracked"):
                    t = module._buffers[buf]
                    module._buffers[buf] = torch.cat([t[:pos], t[src:src + 1].clone(), t[pos:]])
        self._shift_slots(pos, +1)

    def _remove_slot(self, pos: int) -> None:
        """Undo :meth:`_insert_slot` and the insertion of level ``pos``."""
        for name in self._sliced_names:
            module = self.model.get_submodule(name)
            del module._ne_specs[pos]
            if self.bn_mode == "per_level" and _slicing.has_level_rows(module):
                for buf in ("level_running_mean", "level_running_var", "level_num_batches_tracked"):
                    t = module._buffers[buf]
                    module._buffers[buf] = torch.cat([t[:pos], t[pos + 1:]])
        del self.levels_[pos]
        for i, lv in enumerate(self.levels_):
            lv.index = i
        self._shift_slots(pos, -1)

    def _shift_slots(self, pos: int, by: int) -> None:
        state = self._state
        if state.index >= pos + (by < 0):
            state.index += by
        if self.bn_mode == "per_level":
            state.bn_row = state.index
        self._drop_forms()  # the statistics rows were replaced: every form is rebuilt on use

    def _reprepare(self, pos: int) -> None:
        """Rebuild the prepared inference forms after a level was added at ``pos``: of every level if all
        the others had theirs (``prepare_inference`` was not lazy), else on use."""
        info = self.__dict__.get("_inference")
        if info is not None and info["built_all"]:
            for level in self.levels_:
                self._prepared(level.index)

    def _containing_level(self, channels: Mapping[str, int]) -> int:
        for level in self.levels_:
            if all(level.channels[g] >= k for g, k in channels.items()):
                return level.index
        return len(self.levels_) - 1

    def _bn_modules(self) -> list[nn.Module]:
        """Modules holding per-level BatchNorm statistics rows."""
        return [m for m in self.model.modules() if _slicing.has_level_rows(m)]

    def _copy_bn_row(self, src: int, dst: int) -> None:
        for m in self._bn_modules():
            _slicing.copy_row(m, src, dst)

    @contextlib.contextmanager
    def use_level(self, level: LevelLike) -> Iterator["ElasticModel"]:
        """Temporarily activate a level; the previous one is restored on exit."""
        previous = (self._state.index, self._state.bn_row)
        slot = len(self.levels_)
        # an ad-hoc level inside an ad-hoc level reuses its slot: keep what is needed to put it back
        custom = getattr(self, "_custom_channels", None) if previous[0] == slot else None
        rows = None
        if custom is not None and self.bn_mode == "per_level":
            rows = [_slicing.snapshot_row(m, slot) for m in self._bn_modules()]
        self.set_level(level)
        try:
            yield self
        finally:
            if custom is not None and self._custom_channels != custom:
                self._set_spec(slot, custom)
                self._custom_channels = custom
                for m, saved in zip(self._bn_modules(), rows or ()):
                    _slicing.restore_row(m, slot, saved)
            self._state.index, self._state.bn_row = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        info = self.__dict__.get("_inference")
        if info is None or self.model.training or torch.is_grad_enabled():
            return self.model(*args, **kwargs)
        net = self._prepared(self._state.index)
        if net.nni_elastic_deploy["memory_format"] == "channels_last" and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() == 4:  # as the deploy export is fed: no conversion inside the first layer
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return net(*args, **kwargs)

    # ------------------------------------------------------------------ inference form
    def prepare_inference(
        self,
        *,
        lazy: bool = False,
        memory_format: str = "auto",
        batch_size: int = 1,
        compile: bool = False,
    ) -> dict[str, Any]:
        """Precompute every level's inference form, so a level runs at the speed of its deployed export.

        The form of a level is its deploy export (:meth:`export` with ``deploy=True``): physically
        pruned, BatchNorm folded into the convolution or linear layer before it, channels-last
        where that measures faster at ``batch_size`` (``memory_format`` forces a choice), compiled
        with ``compile=True``. ``em(x)`` in eval mode without gradients (``torch.no_grad`` /
        ``torch.inference_mode``) runs the active level's form, so a level runs as fast as a
        dedicated deployed model, and ``set_level`` stays a one-integer switch. Training
        forwards, and direct calls of ``em.model``, run the ordinary sliced forward. When any
        weight or statistic changed since a form was built (training, ``calibrate_bn``,
        ``load_state_dict``), the next inference call rebuilds it; moving or casting the model
        drops the forms. An ad-hoc level (``set_level`` with a width or dict) gets a form on use.

        Args:
            lazy: build a level's form on its first inference call instead of every level now.
            memory_format: ``"auto"`` (measure per level), ``"contiguous"`` or ``"channels_last"``.
            batch_size: the batch the memory format is measured on.
            compile: ``torch.compile`` each form (falls back, with a warning, when it cannot).

        Returns:
            ``{"bytes": memory held by the forms, "levels": levels prepared,
            "memory_format": {level: format}}``. The memory is the sum of the levels' sizes
            (about 2x the full model for widths 0.25/0.5/0.75/1.0).
        """
        from .deploy import MEMORY_FORMATS

        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not supported; use one of {MEMORY_FORMATS}")
        self._inference = {"memory_format": memory_format, "batch_size": int(batch_size), "compile": bool(compile),
                           "forms": {}, "sources": None, "built_all": not lazy}
        if not lazy:
            for level in self.levels_:
                self._prepared(level.index)
        return self.inference_memory()

    def inference_memory(self) -> dict[str, Any]:
        """Memory held by the precomputed inference forms (see :meth:`prepare_inference`)."""
        forms = (self.__dict__.get("_inference") or {}).get("forms", {})
        levels = {slot: form for slot, form in forms.items() if slot < len(self.levels_)}
        return {
            "bytes": sum(_nbytes(form.net) for form in forms.values()),
            "levels": len(levels),
            "memory_format": {slot: form.net.nni_elastic_deploy["memory_format"] for slot, form in sorted(levels.items())},
        }

    def _prepared(self, slot: int) -> nn.Module:
        """The inference form of ``slot``, built now when it is missing or stale."""
        info = self._inference
        if info["sources"] is None:  # every tensor a form reads; version counters tell when one changed
            info["sources"] = (*self.model.parameters(), *self.model.buffers())
        versions = tuple(t._version for t in info["sources"])
        channels = self.levels_[slot].channels if slot < len(self.levels_) else self._custom_channels
        form = info["forms"].get(slot)
        if form is None or form.versions != versions or form.channels != channels:
            with torch.inference_mode(False), torch.enable_grad():  # the export traces through autograd
                net = self.export(slot if slot < len(self.levels_) else None, deploy=True, batch_size=info["batch_size"],
                                  memory_format=info["memory_format"], compile=info["compile"])
            form = info["forms"][slot] = _Prepared(net, dict(channels), versions)
        return form.net

    def _drop_forms(self, slot: Optional[int] = None) -> None:
        """Forget the prepared inference forms (of one slot), and the tensors they were built from."""
        info = self.__dict__.get("_inference")
        if info is not None:
            if slot is None:
                info["forms"].clear()
            else:
                info["forms"].pop(slot, None)
            info["sources"] = None

    def parameter_masks(self, level: LevelLike) -> dict[str, torch.Tensor]:
        """Boolean masks of the entries of every parameter that a level uses (``{name: mask}``).

        Parameters outside sliced modules are used by every level (all ``True``). Used to train
        only the channels a level adds on top of a smaller one, and to check nesting.
        """
        channels = self.channels_of(level) if not isinstance(level, Mapping) else self._channels_from_dict(level, "level")
        specs = self._specs(channels)
        masks: dict[str, torch.Tensor] = {}
        for mod_name, module in self.model.named_modules():
            sliced = dict(specs[mod_name].tensors) if mod_name in specs else {}
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if not sliced.get(p_name):
                    masks[full] = torch.ones_like(p, dtype=torch.bool)
                    continue
                # slice an index grid exactly as the forward slices the parameter
                grid = torch.arange(p.numel(), device=p.device).view(p.shape)
                for axis, sel in sliced[p_name]:
                    grid = _slicing.take(grid, sel.to(p.device) if isinstance(sel, torch.Tensor) else sel, axis)
                used = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                used[grid.reshape(-1)] = True
                masks[full] = used.view(p.shape)
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
                _slicing.reset_row(m, row)
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
    def export(
        self,
        level: Optional[LevelLike] = None,
        *,
        deploy: bool = False,
        batch_size: int = 1,
        memory_format: str = "auto",
        compile: bool = False,
    ) -> nn.Module:
        """A standalone copy of a level (default: the active one), physically pruned with torch-pruning.

        The copy uses the model's own module classes (no nni_elastic layers), holds the level's
        BatchNorm statistics, is in eval mode, scriptable and ONNX-exportable, and computes the
        same outputs as the sliced level.

        With ``deploy=True`` it is also made ready for inference (:func:`nni_elastic.deploy.deploy`):
        BatchNorm folded into the layer before it, and channels-last weights where that measures
        faster at ``batch_size`` on the current device (``memory_format`` forces a choice), and with
        ``compile=True`` compiled by ``torch.compile`` (falls back, with a warning, when it cannot).
        """
        if deploy:
            from .deploy import deploy as deploy_model

            plain = self.export(level)
            example = torch.randn((int(batch_size), *self.example_shape[1:]), device=self._device(),
                                  dtype=_module_dtype(plain))
            return deploy_model(plain, example, memory_format=memory_format, compile=compile)
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
            plain = self.plain_copy(row)
            example = _example_batch(self.example_shape, self._device(), dtype=_module_dtype(plain))
            dg = trace(plain, example)
            for g in self.graph.groups:
                k = channels[g.name]
                if k < g.size:
                    remap(dg)  # chunk and concat sizes changed with the previous group
                    root = plain.get_submodule(g.name)
                    pruner = dg.get_pruner_of_module(root)
                    dg.get_pruning_group(root, pruner.prune_out_channels, sorted(g.order[k:])).prune()
        plain.nni_elastic_channels = dict(channels)
        return plain.eval()

    def plain_copy(self, bn_row: Optional[int] = None) -> nn.Module:
        """A full-width deep copy of the wrapped model with its own classes and one row of BatchNorm statistics.

        ``bn_row`` defaults to the active level's row.
        """
        row = self._state.bn_row if bn_row is None else bn_row
        plain = copy.deepcopy(self.model)
        for m in plain.modules():
            _slicing.make_plain(m, row)
        if hasattr(plain, "nni_elastic_arch"):
            plain.nni_elastic_arch = copy.deepcopy(plain.nni_elastic_arch)
        return plain

    def count(self, level: Optional[LevelLike] = None) -> tuple[int, int]:
        """(MACs, params) of a level at batch 1, counted by torch-pruning on its export."""
        return _count_ops(self.export(level), _example_batch(self.example_shape, self._device()))

    def measure_latency(
        self,
        level: Optional[LevelLike] = None,
        *,
        batch_size: int = 1,
        repeats: int = 30,
        warmup: int = 5,
        exported: bool = False,
        form: Optional[str] = None,
    ) -> float:
        """Median forward time in milliseconds of a level on the model's current device.

        Args:
            level: the level (default: the active one).
            batch_size: batch of the timed input.
            repeats, warmup: timed and untimed runs.
            exported: time the plain export (same as ``form="export"``).
            form: how the level runs (:data:`LATENCY_FORMS`); default ``"sliced"``. ``"deploy"``
                times ``export(deploy=True)`` fed in its memory format; ``"prepared"`` prepares
                inference forms first if needed.

        A level given by index keeps the measurement in ``Level.latency`` (saved with the model).
        """
        form = form or ("export" if exported else "sliced")
        if form not in LATENCY_FORMS:
            raise ValueError(f"form={form!r} is not supported; use one of {LATENCY_FORMS}")
        device = self._device()
        x = torch.randn((int(batch_size), *self.example_shape[1:]), device=device)
        context = self.use_level(level) if level is not None else contextlib.nullcontext()
        with context:
            if form == "deploy":
                net = self.export(deploy=True, batch_size=batch_size)
                if net.nni_elastic_deploy["memory_format"] == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
            elif form == "export":
                net = self.export()
            elif form == "prepared":
                if self.__dict__.get("_inference") is None:
                    self.prepare_inference(lazy=True, batch_size=batch_size)
                net = self
            else:
                net = self.model
            ms = _latency_ms(net, x, repeats, warmup)
        if isinstance(level, int) and not isinstance(level, bool):
            self.levels_[self._index(level)].latency[latency_key(device, batch_size, form)] = ms
        return ms

    def measure_levels(self, batch_size: int = 1, repeats: int = 30, form: str = "sliced") -> list[Level]:
        """Measure and store ``latency_ms`` (and the ``latency`` cache) of every level on the current device."""
        for level in self.levels:
            level.latency_ms = self.measure_latency(level.index, batch_size=batch_size, repeats=repeats, form=form)
        return self.levels_

    def pick_level(
        self,
        *,
        max_macs: Optional[float] = None,
        max_params: Optional[float] = None,
        max_latency_ms: Optional[float] = None,
        batch_size: int = 1,
        form: str = "deploy",
    ) -> int:
        """Index of the largest level that fits every given budget (adapting to the hardware at hand).

        ``max_macs``/``max_params`` in (0, 1] are fractions of the largest level's count, larger
        values are absolute counts. ``max_latency_ms`` is checked against the latency of each level
        in the form it will run in (``form``: ``"deploy"`` export by default, or ``"prepared"``,
        ``"sliced"``, ``"export"``) at ``batch_size`` on the current device: measured once, then
        taken from ``Level.latency`` (saved with the model, so a reloaded model does not measure again).
        """
        if max_macs is None and max_params is None and max_latency_ms is None:
            raise ValueError("pick_level needs at least one budget: max_macs, max_params or max_latency_ms")
        levels = self.levels
        full = levels[-1]
        macs_cap, params_cap = _budget(max_macs, full.macs, "max_macs"), _budget(max_params, full.params, "max_params")
        if max_latency_ms is not None:
            if max_latency_ms <= 0:
                raise ValueError(f"max_latency_ms={max_latency_ms!r} must be positive")
            key = latency_key(self._device(), batch_size, form)
            for level in levels:
                if key not in level.latency:
                    self.measure_latency(level.index, batch_size=batch_size, form=form)
                level.latency_ms = level.latency[key]
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
    def init_config(self) -> dict[str, Any]:
        """Constructor keywords (JSON-able) that rebuild this wrapper around the same weights.

        ``ElasticModel(model, torch.zeros(example_shape), reorder=False, **em.init_config())``
        recreates the levels and slicing of ``em`` on a model holding ``em.model.state_dict()``.
        """
        # groups found unsliceable are kept at full width on reload too (their roots are module paths)
        kept = [root for root in self.graph.problems if root not in self.ignored_layers]
        return {
            "levels": [saved_channels(lv.channels) for lv in self.levels_],
            "bn": self.bn_mode,
            "round_to": self.round_to,
            "ignored_layers": list(self.ignored_layers) + kept,
            "unsupported": self.unsupported,
        }

    def save(self, path: PathLike, *, pickle_model: bool = False, **metadata: Any) -> None:
        """Write the architecture, levels, weights and ``metadata`` atomically to ``path`` (no pickled code).

        A zoo model is stored as its registry name and keywords, any other model as weights only
        (load it with ``load(path, model=...)``); ``pickle_model=True`` also stores it pickled,
        which only ``load(path, trust=True)`` unpickles. Format: :mod:`nni_elastic.checkpoint`.
        """
        from .checkpoint import save_elastic

        save_elastic(self, path, metadata, pickle_model=pickle_model)

    @classmethod
    def load(cls, path: PathLike, *, model: Optional[nn.Module] = None, trust: bool = False,
             map_location: Any = "cpu") -> "ElasticModel":
        """Load a checkpoint written by :meth:`save`; the file is read with ``weights_only=True``.

        Args:
            path: the checkpoint file.
            model: a new instance of the architecture, for models outside the zoo.
            trust: unpickle a model stored with ``save(pickle_model=True)``; this runs code from
                the file, so only for files you wrote yourself.
            map_location: passed to ``torch.load``.
        """
        from .checkpoint import load_elastic

        return load_elastic(cls, path, model=model, trust=trust, map_location=map_location)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, with one clear line when ``state_dict`` has another number of levels."""
        from .checkpoint import check_level_rows

        check_level_rows(self, state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._drop_forms()  # with assign=True the prepared forms' source tensors were replaced
        return result

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the ``prepare_inference`` settings; the forms are rebuilt on use."""
        state = self.__dict__.copy()
        info = state.get("_inference")
        if info is not None:
            state["_inference"] = {**info, "forms": {}, "sources": None}
        return state

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


# the shared counter, timer and budget parser (nni_elastic.measure), also used by the subnet searches


def _first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, or a tuple/list/dict holding tensors)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (list, tuple)) else ()
    for item in items:
        try:
            return _first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor to compare")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return math.inf
    scale = float(b[finite].abs().max()) if finite.any() else 0.0
    err = float((a - b)[finite].abs().max()) if finite.any() else 0.0
    return err / max(scale, 1e-30) if err > 0 else 0.0


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Equal up to ``rtol`` of the output scale (the largest magnitude of ``b``)."""
    return _rel_err(a, b) <= rtol


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def latency_key(device: Union[str, torch.device], batch_size: int, form: str) -> str:
    """``"<device>/b<batch>/<form>"``: a CUDA device is named by its card, so a cache entry moves with the file
    only to the same hardware."""
    device = torch.device(device)
    name = device.type
    if device.type == "cuda":
        name = f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{name}/b{int(batch_size)}/{form}"


@dataclass
class _Prepared:
    """A level's inference form: its deploy export, the channels it was built for, and the version
    counters of the model's tensors then (a changed counter makes it stale)."""

    net: nn.Module
    channels: dict[str, int]
    versions: tuple[int, ...]


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@contextlib.contextmanager
def _as_float64(module: nn.Module) -> Iterator[None]:
    """Run a model in float64 for a moment (float32 -> float64 -> float32 is exact)."""
    dtype = _module_dtype(module)
    module.to(torch.float64)
    try:
        yield
    finally:
        module.to(dtype)
