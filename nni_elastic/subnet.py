"""Per-stage subnets of a trained elastic model, evaluated on the shared weights (no training).

:class:`SubnetEvaluator` (cost counted on the export, BatchNorm recalibrated, accuracy; both
cached per channel configuration) and :func:`evaluate_subnet` (one configuration against a
MACs/latency budget) are what an Optuna subnet-search trial and an NNI subnet trial
(``python -m nni_elastic.nni.subnet_trial``) compute. The mapping of per-stage widths to a level
is :mod:`nni_elastic.stages` (re-exported here).

Example:
    >>> ev = SubnetEvaluator.from_checkpoint(em)            # data split as in training
    >>> cap = macs_budget(0.5, ev.full_cost()["macs"], "max_macs")            # half the full MACs
    >>> evaluate_subnet(ev, {"conv1": 0.5, "layer1": 0.5, "layer2": 0.75, "layer3": 1.0}, macs_cap=cap)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .checkpoint import atomic_write_json
from .data import load_dataset, make_loader
from .device import resolve_device
from .elastic import ElasticModel
from .measure import budget, count_ops, latency_ms
from .reporting import save_module
from .stages import model_stages, stage_groups, stage_level
from .training import evaluate

__all__ = ["model_stages", "stage_groups", "stage_level", "SubnetEvaluator", "evaluate_subnet", "data_settings",
           "search_data", "macs_budget", "latency_budget", "export_latency_ms", "export_subnet"]


# ---------------------------------------------------------------------- evaluation on shared weights
class SubnetEvaluator:
    """Costs and accuracy of per-group levels on one ElasticModel, cached per channel configuration.

    Args:
        em: the elastic model (on ``device``, in eval mode).
        calib: BatchNorm calibration batches (inputs), the same for every configuration.
        val: validation data (a dataset or loader).
        device: where ``em`` lives.
        latency: also measure the export's latency (ms) in :meth:`cost`.
        latency_batch_size, latency_repeats: latency measurement settings.
    """

    def __init__(self, em: ElasticModel, calib: list, val: Any, device: torch.device, latency: bool,
                 latency_batch_size: int, latency_repeats: int) -> None:
        self.em, self.calib, self.val, self.device = em, calib, val, device
        self.latency, self.latency_batch_size, self.latency_repeats = latency, latency_batch_size, latency_repeats
        self.costs: dict[tuple, dict[str, Any]] = {}
        self.accuracy: dict[tuple, float] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | ElasticModel, *, data: Optional[str] = None,
                        data_root: Optional[str] = None, seed: int = 0, calibrate_batches: int = 10,
                        batch_size: Optional[int] = None, val_limit: Optional[int] = None, device: str = "auto",
                        latency: bool = False, latency_batch_size: int = 1, latency_repeats: int = 20) -> "SubnetEvaluator":
        """Load an ``elastic.pt`` (or take a loaded model) and its data, split as in training (:func:`search_data`)."""
        dev = resolve_device(device)
        em = checkpoint if isinstance(checkpoint, ElasticModel) else ElasticModel.load(checkpoint)
        em = em.to(dev).eval()
        _, calib, val = search_data(em, data, data_root, seed, calibrate_batches, batch_size, val_limit, dev)
        return cls(em, calib, val, dev, latency, latency_batch_size, latency_repeats)

    def key(self, level: Mapping[str, float]) -> tuple:
        return tuple(sorted(self.em.channels_of(dict(level)).items()))

    def cost(self, level: Mapping[str, float]) -> dict[str, Any]:
        """``{"macs", "params", "latency_ms"}`` of the level's compact export (latency None unless measured)."""
        k = self.key(level)
        if k not in self.costs:
            exported = self.em.export(dict(level))
            example = torch.zeros((1, *self.em.example_shape[1:]), device=self.device)
            macs, params = count_ops(exported, example)
            entry = {"macs": macs, "params": params, "latency_ms": None}
            if self.latency:
                entry["latency_ms"] = export_latency_ms(exported, self.em.example_shape, self.device,
                                                        self.latency_batch_size, self.latency_repeats)
            self.costs[k] = entry
        return self.costs[k]

    def full_cost(self) -> dict[str, Any]:
        """Cost of the full network (every group at width 1)."""
        return self.cost({g: 1.0 for g in self.em.graph.names})

    def activate(self, level: Mapping[str, float]) -> None:
        """Switch to the level and recompute its BatchNorm statistics on the calibration batches."""
        self.em.set_level(dict(level))
        self.em.calibrate_bn(self.calib)

    def evaluate(self, level: Mapping[str, float]) -> float:
        """Validation accuracy of the level (BatchNorm recalibrated first)."""
        k = self.key(level)
        if k not in self.accuracy:
            self.activate(level)
            self.accuracy[k] = evaluate(self.em, self.val, device=self.device)["accuracy"]
        return self.accuracy[k]


def evaluate_subnet(ev: SubnetEvaluator, widths: Mapping[str, float], *, macs_cap: float = math.inf,
                    latency_cap: float = math.inf, full: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Cost and (when within budget) accuracy of one per-stage configuration.

    Args:
        ev: the evaluator of a trained elastic model.
        widths: ``{stage: width}`` (see :func:`stage_level`).
        macs_cap, latency_cap: absolute budgets (:func:`macs_budget`, :func:`latency_budget`);
            ``inf`` means none.
        full: the full network's cost (default ``ev.full_cost()``).

    Returns ``{"widths", "channels", "macs", "macs_ratio", "params", "params_ratio", "latency_ms",
    "accuracy", "feasible", "constraint"}``; ``constraint`` is ``[macs / cap - 1, latency / cap - 1]``
    (the latency entry only with a latency budget), feasible when every entry is <= 0. An
    infeasible configuration is not evaluated: its accuracy is 0.

    Example:
        >>> row = evaluate_subnet(ev, {"conv1": 0.5, "layer1": 0.5, "layer2": 1.0, "layer3": 1.0},
        ...                       macs_cap=macs_budget(0.5, ev.full_cost()["macs"], "max_macs"))
    """
    full = full if full is not None else ev.full_cost()
    level = stage_level(ev.em, widths)
    cost = ev.cost(level)
    constraint = [cost["macs"] / macs_cap - 1.0 if math.isfinite(macs_cap) else -1.0]
    if math.isfinite(latency_cap):
        constraint.append(cost["latency_ms"] / latency_cap - 1.0)
    feasible = all(c <= 0 for c in constraint)
    accuracy = ev.evaluate(level) if feasible else 0.0  # infeasible: not evaluated, penalised
    return {"widths": dict(widths), "channels": ev.em.channels_of(level), "macs": cost["macs"],
            "macs_ratio": cost["macs"] / full["macs"], "params": cost["params"],
            "params_ratio": cost["params"] / full["params"], "latency_ms": cost["latency_ms"],
            "accuracy": accuracy, "feasible": feasible, "constraint": constraint}


def export_latency_ms(net: torch.nn.Module, shape: Sequence[int], device: torch.device, batch: int, repeats: int) -> float:
    """Median forward time (ms) of a module on ``device`` for a zero batch of ``shape[1:]`` (:func:`~nni_elastic.measure.latency_ms`)."""
    return latency_ms(net, torch.zeros((batch, *shape[1:]), device=device), repeats=repeats, warmup=3)


def data_settings(em: ElasticModel, data: Optional[str], data_root: Optional[str]) -> tuple[str, dict[str, Any], int]:
    """Dataset name, split settings and batch size: those the checkpoint was trained with (so the
    validation split is the held-out one), unless another dataset is named."""
    meta = getattr(em, "metadata", None) or {}
    recipe = meta.get("recipe") or {}
    rec_data = recipe.get("data") or {}
    name = data or rec_data.get("name") or meta.get("dataset") or "digits"
    kwargs: dict[str, Any] = {"root": data_root}
    if rec_data.get("name") == name:
        kwargs.update(val_fraction=rec_data.get("val_fraction", 0.2), seed=rec_data.get("seed", 0),
                      image_size=rec_data.get("image_size"))
        if data_root is None:
            kwargs["root"] = rec_data.get("root")
    batch_size = int((recipe.get("train") or {}).get("batch_size", 64))
    return name, kwargs, batch_size


def search_data(em: ElasticModel, data: Optional[str], data_root: Optional[str], seed: int, calibrate_batches: int,
                batch_size: Optional[int], val_limit: Optional[int], device: torch.device) -> tuple[str, list, Any]:
    """Dataset name, the calibration batches (the same for every configuration) and the validation data."""
    name, data_kwargs, recipe_batch = data_settings(em, data, data_root)
    splits = load_dataset(name, **data_kwargs)
    calib = []
    for x, _ in make_loader(splits.train, batch_size or recipe_batch, shuffle=True, seed=seed):
        if len(calib) >= calibrate_batches:
            break
        calib.append(x.to(device))
    val = splits.val
    if val_limit is not None:
        val = torch.utils.data.Subset(val, range(min(val_limit, len(val))))
    return name, calib, val


def macs_budget(value: Optional[float], full: float, name: str) -> float:
    """A MACs budget as absolute MACs: a fraction of ``full`` if <= 1, else absolute; None: ``inf``."""
    return budget(value, full, name)


def latency_budget(value: Optional[float]) -> float:
    """A latency budget in ms (None: ``inf``)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"max_latency_ms={value!r} must be a positive number of milliseconds")
    return float(value)


def export_subnet(em: ElasticModel, best: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the active level (with its recalibrated BatchNorm statistics) to ``out_dir``:
    ``subnet.ts`` (TorchScript), ``subnet.state.pt`` (weights + architecture) and ``subnet.json`` (``best``)."""
    out_dir = Path(out_dir)
    written = save_module(em.export().cpu(), out_dir / "subnet", torch.zeros((1, *em.example_shape[1:])))
    written.append(atomic_write_json(dict(best), out_dir / "subnet.json"))
    return written
