"""Stages of an elastic model: per-stage widths -> a per-group level (shared by the NNI and Optuna searches).

A stage key names a module path; a channel group belongs to the stage whose key equals its root
module's path or is a dotted prefix of it (the longest such key wins). For the zoo's ResNets the
keys are the top-level modules ``conv1``, ``layer1``, ``layer2``, ``layer3``; for VGG/AlexNet
``features`` and ``classifier`` or finer keys such as ``features.0``. Groups of no stage keep
their full width.

Example:
    >>> em.set_level(stage_level(em, {"conv1": 0.5, "layer1": 0.5, "layer2": 0.75, "layer3": 1.0}))
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from .elastic import ElasticModel

__all__ = ["model_stages", "stage_groups", "stage_level"]


def model_stages(em: ElasticModel) -> list[str]:
    """Top-level modules of the groups' roots, in model order (``["conv1", "layer1", ...]``)."""
    seen: list[str] = []
    for name in em.graph.names:
        top = name.split(".", 1)[0]
        if top not in seen:
            seen.append(top)
    order = [n for n, _ in em.model.named_children()]
    return sorted(seen, key=lambda s: order.index(s) if s in order else len(order))


def _stage_of(group: str, stages: Iterable[str]) -> Optional[str]:
    best = None
    for s in stages:
        if (group == s or group.startswith(s + ".")) and (best is None or len(s) > len(best)):
            best = s
    return best


def stage_groups(em: ElasticModel, stages: Iterable[str]) -> dict[str, list[str]]:
    """``{stage: [group, ...]}``: each channel group under the longest stage key prefixing its root path."""
    stages = list(stages)
    out: dict[str, list[str]] = {s: [] for s in stages}
    for group in em.graph.names:
        s = _stage_of(group, stages)
        if s is not None:
            out[s].append(group)
    empty = [s for s, groups in out.items() if not groups]
    if empty:
        raise ValueError(f"stage(s) {empty} match no channel group of this model; its stages (top-level modules "
                         f"of the groups' roots) are {model_stages(em)}, its groups {em.graph.names}; pass a search "
                         f"space with these keys (search_spaces/subnet_search_vgg16.json for VGG-16)")
    return out


def stage_level(em: ElasticModel, widths: Mapping[str, float]) -> dict[str, float]:
    """Per-stage widths -> the ``{group: width}`` level for ``em.set_level`` (other groups stay full)."""
    level = {}
    for stage, groups in stage_groups(em, widths).items():
        w = widths[stage]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"stage {stage!r}: width {w!r} must be a fraction in (0, 1]")
        level.update({g: float(w) for g in groups})
    return level
