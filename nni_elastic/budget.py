"""Levels chosen by what the hardware needs: MACs or latency budgets, per-group (non-uniform) widths.

``budgets(macs=[0.1, 0.25, 0.4, 1.0])`` asks for one level per fraction of the full network's MACs;
``budgets(latency_ms=[2, 4, 8], batch_size=64)`` for one level per latency on the current device
(deployed form, at that batch); ``budgets(widths=[...])`` is today's uniform widths. A strategy
(``PruneAndGrow(levels=...)``, the recipe key ``elastic.levels: {macs: [...]}``) turns budgets into
channel counts per group with :func:`allocate`:

1. Score every channel by the chosen importance (``l1``, ``taylor``, ...), normalised by its
   group's mean score (torch-pruning's ``mean`` normalisation), so groups compare.
2. Remove channels greedily from the full network, one block at a time, always from the group
   whose next block costs the least normalised importance per MAC saved (MACs of each group from
   the convolutions and linear layers it feeds and reads, at the example's input size), never
   below ``min_width`` of a group. Each budget is met where the path first fits it.
3. Because one path serves every budget, the levels are nested by construction. A level's MACs
   are then counted by torch-pruning on its export (the path's estimate covers convolutions and
   linear layers only) and the path goes on until the exact count fits.

Latency budgets walk the same path and keep, for each budget, the largest point whose measured
latency fits (a bisection over the path; each probe times a deployed export).

Example:
    >>> import nni_elastic as ne
    >>> pg = ne.PruneAndGrow(levels=ne.budgets(macs=[0.1, 0.25, 0.4, 1.0]))   # or a recipe's elastic.levels
    >>> plan = ne.allocate(model, example, ne.budgets(macs=[0.1, 0.4, 1.0]), calibration=[(x, y)])
    >>> em = ne.ElasticModel(model, example, levels=plan.levels)
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import ImportanceFn

__all__ = ["BUDGET_KINDS", "Budgets", "budgets", "parse_levels", "LevelPlan", "MacModel", "allocate"]

logger = logging.getLogger(__name__)

BUDGET_KINDS = ("widths", "macs", "latency_ms")


@dataclass(frozen=True)
class Budgets:
    """What each level must fit: ``kind`` is ``"widths"``, ``"macs"`` (fractions of the full
    network's MACs) or ``"latency_ms"`` (milliseconds at ``batch_size`` on the current device, in
    the ``form`` the level will run in); ``values`` smallest first."""

    kind: str
    values: tuple[float, ...]
    batch_size: int = 1
    form: str = "deploy"
    min_width: float = 0.125

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: list(self.values)}
        if self.kind == "latency_ms":
            out.update(batch_size=self.batch_size, form=self.form)
        if self.kind != "widths" and self.min_width != 0.125:
            out["min_width"] = self.min_width
        return out

    def label(self, i: int) -> str:
        v = self.values[i]
        return {"widths": f"w{v:.3f}", "macs": f"m{v:.3f}", "latency_ms": f"t{v:g}ms"}[self.kind]


def budgets(*, macs: Optional[Sequence[float]] = None, latency_ms: Optional[Sequence[float]] = None,
            widths: Optional[Sequence[float]] = None, batch_size: int = 1, form: str = "deploy",
            min_width: float = 0.125) -> Budgets:
    """Level budgets: give exactly one of ``macs``, ``latency_ms``, ``widths`` (smallest first).

    ``macs``: fractions in (0, 1] of the full network's MACs. ``latency_ms``: milliseconds per
    forward of ``batch_size`` samples on the current device, timed in ``form`` (``"deploy"``:
    BatchNorm folded; see :data:`nni_elastic.elastic.LATENCY_FORMS`). ``min_width``: no group of a
    MACs or latency level keeps fewer than this fraction of its channels.
    """
    given = {k: v for k, v in (("macs", macs), ("latency_ms", latency_ms), ("widths", widths)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of macs=, latency_ms=, widths= (got {sorted(given) or 'none'})")
    kind, raw = next(iter(given.items()))
    return parse_levels({kind: list(raw), **({"batch_size": batch_size, "form": form} if kind == "latency_ms" else {}),
                         **({"min_width": min_width} if kind != "widths" else {})}, where="levels")


def parse_levels(spec: Union[Budgets, Mapping[str, Any]], where: str = "elastic.levels") -> Budgets:
    """A :class:`Budgets` from its recipe form (``{macs: [...]}``, ``{latency_ms: [...], batch_size: 64}``,
    ``{widths: [...]}``); errors name ``where`` and the key."""
    from .elastic import LATENCY_FORMS

    if isinstance(spec, Budgets):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping such as {{macs: [0.1, 0.25, 0.4, 1.0]}}, got {spec!r}")
    kinds = [k for k in BUDGET_KINDS if k in spec]
    unknown = sorted(set(spec) - set(BUDGET_KINDS) - {"batch_size", "form", "min_width"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; use one of {list(BUDGET_KINDS)} "
                         f"(with batch_size/form for latency_ms, min_width for macs and latency_ms)")
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of {list(BUDGET_KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    values = spec[kind]
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{where}.{kind}: a non-empty list of numbers, smallest first")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{where}.{kind}: {v!r} must be a positive number")
        if kind != "latency_ms" and v > 1:
            raise ValueError(f"{where}.{kind}: {v!r} is a fraction of the full network and must be in (0, 1]")
    if any(not b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"{where}.{kind}: {list(values)} must be strictly increasing (smallest level first)")
    if kind != "latency_ms" and ("batch_size" in spec or "form" in spec):
        raise ValueError(f"{where}: batch_size and form apply to latency_ms budgets only")
    batch = spec.get("batch_size", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{where}.batch_size: {batch!r} must be an integer >= 1")
    form = spec.get("form", "deploy")
    if form not in LATENCY_FORMS:
        raise ValueError(f"{where}.form: {form!r} is not one of {list(LATENCY_FORMS)}")
    if kind == "widths" and "min_width" in spec:
        raise ValueError(f"{where}: min_width applies to macs and latency_ms budgets (widths are uniform)")
    min_width = spec.get("min_width", 0.125)
    if isinstance(min_width, bool) or not isinstance(min_width, (int, float)) or not 0 < min_width <= 1:
        raise ValueError(f"{where}.min_width: {min_width!r} must be a fraction in (0, 1]")
    return Budgets(kind, tuple(float(v) for v in values), int(batch), str(form), float(min_width))


# ---------------------------------------------------------------------- MACs of a channel plan
class MacModel:
    """MACs of the convolutions and linear layers of a wrapped model for any ``{group: k}``, without an export.

    Built once from one forward at full width (kernel sizes, output sizes); a plan's count is
    then a sum over layers of ``out * in / groups * kernel * positions`` with the kept channel
    counts of each layer's input and output dims taken from the channel graph.
    """

    def __init__(self, model: nn.Module, graph: Any, example: torch.Tensor) -> None:
        self.graph = graph
        self.layers: list[tuple[str, int, int, int, int, bool]] = []  # name, in, out, groups, factor, depthwise
        shapes: dict[str, torch.Size] = {}
        hooks = []
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)):
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, name=name: shapes.__setitem__(name, (i[0].shape, o.shape))))
        try:
            with torch.no_grad():
                model.eval()
                model(example[:1])
        finally:
            for h in hooks:
                h.remove()
        modules = dict(model.named_modules())
        for name, (in_shape, out_shape) in shapes.items():
            m = modules[name]
            if isinstance(m, nn.Linear):
                positions = int(math.prod(out_shape[:-1]))
                self.layers.append((name, m.in_features, m.out_features, 1, positions, False))
                continue
            kernel = int(math.prod(m.kernel_size))
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
                positions = int(math.prod(in_shape[2:]))  # every input position scatters a kernel
            else:
                positions = int(math.prod(out_shape[2:]))
            depthwise = m.groups > 1 and m.groups == m.in_channels
            self.layers.append((name, m.in_channels, m.out_channels, m.groups, kernel * positions, depthwise))
        # per (module, dim): for each group member on it, how many positions the roots beyond k cover
        self._drops: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
        for g in graph.groups:
            for mem in g.members:
                if mem.dim not in ("in", "out"):
                    continue
                sizes = [len(mem.positions[r]) for r in g.order]
                tail = [0] * (len(sizes) + 1)
                for i in range(len(sizes) - 1, -1, -1):
                    tail[i] = tail[i + 1] + sizes[i]
                self._drops.setdefault((mem.module, mem.dim), []).append((g.name, tail))
        self.group_layers: dict[str, set[str]] = {}
        for (module, _), entries in self._drops.items():
            for gname, _ in entries:
                self.group_layers.setdefault(gname, set()).add(module)
        self.full = self(None)

    def _kept(self, name: str, dim: str, full: int, channels: Optional[Mapping[str, int]]) -> int:
        if channels is None:
            return full
        gone = sum(tail[int(channels.get(g, len(tail) - 1))] for g, tail in self._drops.get((name, dim), ()))
        return max(full - gone, 0)

    def __call__(self, channels: Optional[Mapping[str, int]]) -> float:
        total = 0.0
        for name, cin, cout, groups, factor, depthwise in self.layers:
            k_in, k_out = self._kept(name, "in", cin, channels), self._kept(name, "out", cout, channels)
            if depthwise:
                total += k_out * factor  # one input channel per output channel at any width
            else:
                total += k_out * k_in / groups * factor
        return total


# ---------------------------------------------------------------------- the greedy path
@dataclass
class LevelPlan:
    """Channel counts per group for each level (smallest first), and how they were found.

    Attributes:
        levels: ``{group: channels}`` per level, nested.
        budgets: the budgets asked for.
        macs: MACs of each level (torch-pruning's count at batch 1); ``macs_ratio`` to the full network.
        latency_ms: each level's measured latency (latency budgets only).
        path: the greedy path's points ``(estimated MACs fraction, {group: channels})``, largest first,
            for intermediate pruning targets (:meth:`at_fraction`).
    """

    levels: list[dict[str, int]]
    budgets: Budgets
    macs: list[int] = field(default_factory=list)
    macs_ratio: list[float] = field(default_factory=list)
    latency_ms: list[Optional[float]] = field(default_factory=list)
    path: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def at_fraction(self, fraction: float) -> dict[str, int]:
        """The first point of the path whose estimated MACs fraction is at most ``fraction``."""
        for frac, chans in self.path:
            if frac <= fraction + 1e-12:
                return dict(chans)
        return dict(self.path[-1][1])

    def estimated_fraction(self, channels: Mapping[str, int]) -> float:
        for frac, chans in self.path:
            if all(chans[g] <= channels.get(g, chans[g]) for g in chans):
                return frac
        return self.path[-1][0]

    def to_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "budgets": self.budgets.to_dict(), "macs": self.macs,
                "macs_ratio": self.macs_ratio, "latency_ms": self.latency_ms}


def _group_scores(em: Any, importance: Union[str, ImportanceFn], data: Optional[Iterable], loss_fn: Callable) -> dict[str, torch.Tensor]:
    scores = em.channel_scores(importance, data=data, loss_fn=loss_fn)
    out = {}
    for g in em.graph.groups:
        s = scores[g.name].clamp_min(0).double()[torch.tensor(g.order)]
        # in the order levels keep channels (a level keeps a prefix), normalised by the group's mean
        out[g.name] = s / s.mean().clamp_min(1e-12)
    return out


SENSITIVITY_POINTS = 8
LATENCY_SWEEP = 12


@torch.no_grad()
def _sensitivity_scores(em: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: Callable,
                        floor: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per group, the loss increase of keeping its first ``k`` channels (every other group at full
    width), interpolated over ``k`` from a few measured widths: ``cost[k - step:k].sum()`` is the
    increase of removing channels ``k - step .. k``.

    Each point is one forward of the calibration batches with BatchNorm on batch statistics (the
    level has no statistics of its own yet), so it measures what the channels carry, not how far
    the running statistics are off.
    """
    was_training = em.training
    em.train()
    device = em._device()

    def loss(channels: Optional[dict[str, int]]) -> float:
        total, n = 0.0, 0
        with em.use_level(1.0 if channels is None else channels):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                total += float(loss_fn(em(x), y)) * len(y)
                n += len(y)
        return total / max(n, 1)

    try:
        base = loss(None)
        out = {}
        for g in em.graph.groups:
            lo = floor[g.name]
            ks = sorted({int(round(lo + (g.size - lo) * i / SENSITIVITY_POINTS)) for i in range(SENSITIVITY_POINTS + 1)})
            rise = {g.size: 0.0}
            for k in ks:
                if k < g.size:
                    rise[k] = max(loss({g.name: k}) - base, 0.0)
            # loss at every k by linear interpolation, made non-increasing in k (more channels never hurt)
            known = sorted(rise)
            curve = torch.from_numpy(np.interp(np.arange(g.size + 1), known, [rise[j] for j in known]))
            curve = torch.flip(torch.cummax(torch.flip(curve, [0]), 0).values, [0])
            out[g.name] = (curve[:-1] - curve[1:]).clamp_min(0) + 1e-9  # cost of channel k: curve[k] - curve[k + 1]
        return out
    finally:
        em.train(was_training)


def _floors(em: Any, min_width: float) -> dict[str, int]:
    # at least two channels where a group has them (a count of 1 would read as the width 1.0 in a level dict)
    return {g.name: max(em._round(g), int(math.ceil(min_width * g.size / em._round(g))) * em._round(g), min(2, g.size))
            for g in em.graph.groups}


def _greedy_path(em: Any, macs: MacModel, scores: Mapping[str, torch.Tensor], min_width: float,
                 stop_fraction: float) -> list[tuple[float, dict[str, int]]]:
    """Remove the cheapest block (normalised importance per MAC saved) until ``stop_fraction`` of the MACs."""
    groups = {g.name: g for g in em.graph.groups}
    chans = {name: g.size for name, g in groups.items()}
    floor = _floors(em, min_width)
    block = {name: max(em._round(g), (g.size // 32) // em._round(g) * em._round(g)) for name, g in groups.items()}
    full = macs.full
    current = macs(chans)
    path = [(current / full, dict(chans))]
    neighbours: dict[str, set[str]] = {}
    for a, la in macs.group_layers.items():
        neighbours[a] = {b for b, lb in macs.group_layers.items() if la & lb}
    cache: dict[str, Optional[tuple[float, float]]] = {}

    def candidate(name: str) -> Optional[tuple[float, float]]:
        k = chans[name]
        step = min(block[name], k - floor[name])
        if step <= 0:
            return None
        trial = dict(chans, **{name: k - step})
        saved = current - macs(trial)
        if saved <= 0:
            return None
        cost = float(scores[name][k - step:k].sum())
        return cost / saved, saved

    while current / full > stop_fraction:
        for name in groups:
            if name not in cache:
                cache[name] = candidate(name)
        options = [(c[0], name) for name, c in cache.items() if c is not None]
        if not options:
            break
        _, best = min(options)
        chans[best] -= min(block[best], chans[best] - floor[best])
        current = macs(chans)
        path.append((current / full, dict(chans)))
        for name in neighbours.get(best, {best}) | {best}:
            cache.pop(name, None)
    return path


def allocate(model: nn.Module, example: torch.Tensor, spec: Union[Budgets, Mapping[str, Any]], *,
             importance: Union[str, ImportanceFn] = "l1", data: Optional[Iterable] = None,
             loss_fn: Callable = F.cross_entropy, ignored_layers: Sequence[str] = (), round_to: int = 1,
             unsupported: str = "error", extra_fractions: Sequence[float] = (),
             calibration: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None) -> LevelPlan:
    """Per-group channel counts for each budget (see the module docstring); ``model`` is not changed.

    ``calibration``: batches ``(x, y)`` to measure each group's sensitivity (the loss increase when
    only that group shrinks); the path then removes the channels that cost the least loss per MAC.
    Without them it uses the ``importance`` scores, normalised per group, instead.
    ``extra_fractions``: further MACs fractions the path must reach (intermediate pruning targets).
    Widths budgets give uniform levels (every group at the width).
    """
    from .elastic import ElasticModel

    spec = parse_levels(spec)
    work = copy.deepcopy(model)
    # a scratch wrap of a copy: the graph, the importance order, exact counts (the real wrap redoes the same order)
    em = ElasticModel(work, example, (1.0,), importance=importance, ignored_layers=ignored_layers, round_to=round_to,
                      unsupported=unsupported, verify=False, data=data, loss_fn=loss_fn)
    mac_model = MacModel(em.model, em.graph, example.to(em._device()))
    counted: dict[tuple, int] = {}

    def macs_of(channels: Mapping[str, int]) -> int:  # torch-pruning's count on the export, once per plan
        key = tuple(sorted(channels.items()))
        if key not in counted:
            counted[key] = int(em.count(dict(channels))[0])
        return counted[key]

    full = macs_of(em.channels_of(1.0))
    if spec.kind == "widths":
        levels = [em.channels_of(float(w)) for w in spec.values]
        plan = LevelPlan(levels, spec)
        plan.path = sorted(((mac_model(c) / mac_model.full, c) for c in levels), key=lambda t: -t[0])
    else:
        if calibration:
            scores = _sensitivity_scores(em, list(calibration), loss_fn, _floors(em, spec.min_width))
        else:
            scores = _group_scores(em, importance, data, loss_fn)
        lowest = min([*([v for v in spec.values] if spec.kind == "macs" else []), *extra_fractions, 1.0])
        path = _greedy_path(em, mac_model, scores, spec.min_width, stop_fraction=0.0 if spec.kind == "latency_ms" else lowest * 0.5)
        plan = LevelPlan([], spec, path=path)
        if spec.kind == "macs":
            plan.levels = [_fit_macs(path, v, macs_of, full) for v in spec.values]
        else:
            plan.levels, plan.latency_ms = _fit_latency(em, path, spec)
    for chans in plan.levels:
        n = macs_of(chans)
        plan.macs.append(n)
        plan.macs_ratio.append(n / full)
    if spec.kind == "macs":
        for i, (budget, got) in enumerate(zip(spec.values, plan.macs_ratio)):
            if got > budget + 1e-9:
                logger.warning("level %d: %.1f%% of the MACs, over its budget %.1f%% (every group at min_width=%g)",
                               i, 100 * got, 100 * budget, spec.min_width)
    return plan


def _fit_macs(path: list[tuple[float, dict[str, int]]], budget: float, macs_of: Callable[[Mapping[str, int]], int],
              full: int) -> dict[str, int]:
    """The first point of the path whose exact MACs (``macs_of``: torch-pruning's count) fit ``budget`` of ``full``."""
    if budget >= 1.0:
        return dict(path[0][1])
    start = next((i for i, (frac, _) in enumerate(path) if frac <= budget), len(path) - 1)
    for i in range(start, len(path)):
        chans = path[i][1]
        if macs_of(chans) <= budget * full:
            return dict(chans)
    return dict(path[-1][1])


def _fit_latency(em: Any, path: list[tuple[float, dict[str, int]]], spec: Budgets) -> tuple[list[dict[str, int]], list[float]]:
    """For each latency budget, the largest point of the path that runs within it.

    The path is timed at a dozen points spread over its MACs (log-spaced), then each budget is
    refined by bisection between the largest sampled point that fits and the next larger one.
    Timing is noisy, so latency need not fall strictly along the path: a coarse sweep first keeps
    one slow outlier from sending a bisection far off.
    """
    timed: dict[int, float] = {}

    def latency(i: int) -> float:
        if i not in timed:
            timed[i] = em.measure_latency(path[i][1], batch_size=spec.batch_size, form=spec.form)
        return timed[i]

    fracs = [f for f, _ in path]
    last = len(path) - 1
    sample = {0, last}
    for t in range(1, LATENCY_SWEEP):
        target = math.exp(math.log(fracs[-1]) * t / LATENCY_SWEEP)
        sample.add(next((i for i, f in enumerate(fracs) if f <= target), last))
    sample_sorted = sorted(sample)
    for i in sample_sorted:
        latency(i)
    logger.info("latency sweep (MACs fraction: ms): %s", ", ".join(f"{fracs[i]:.3f}: {timed[i]:.2f}" for i in sample_sorted))
    levels, measured = [], []
    start = 0
    for budget in sorted(spec.values, reverse=True):  # largest first: each level is inside the previous one
        fitting = [i for i in sample_sorted if i >= start and timed[i] <= budget]
        if not fitting:
            raise ValueError(f"elastic.levels.latency_ms: {budget:g} ms is below the smallest network the path "
                             f"reaches ({timed[last]:.3f} ms at batch {spec.batch_size} in {spec.form} form on this "
                             f"device); raise the budget or lower min_width")
        hi = fitting[0]
        larger = [i for i in sample_sorted if start <= i < hi]
        lo = larger[-1] + 1 if larger else start
        while lo < hi:  # first index (largest network) in (previous sample, hi] that fits
            mid = (lo + hi) // 2
            if latency(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        levels.append(dict(path[hi][1]))
        measured.append(latency(hi))
        start = hi
    levels.reverse()
    measured.reverse()
    # nested and strictly smaller: equal neighbours would be the same level twice
    for i in range(1, len(levels)):
        if levels[i] == levels[i - 1]:
            raise ValueError(f"elastic.levels.latency_ms: budgets {spec.values[i - 1]:g} and {spec.values[i]:g} ms give "
                             f"the same network on this device (batch {spec.batch_size}); spread the budgets")
    return levels, measured
