"""Search per-stage widths of a trained ElasticModel on its shared weights: seconds per trial, no training.

A trial picks one width per *stage* (``search_spaces/subnet_search.json``), activates that ad-hoc
level (``em.set_level({group: width})``), recomputes its BatchNorm statistics on a few training
batches (the same batches every trial) and evaluates it on the validation split. Its cost is
counted on the compact export (MACs/params with torch-pruning; latency, when asked, measured on
the export on this device) and cached per channel configuration; accuracy is cached too, so a
repeated proposal costs nothing.

Shipped spaces: ``subnet_search.json`` (the default: ResNet stages at the widths the digits and
Fashion-MNIST recipes train, 0.25/0.5/0.75/1.0), ``subnet_search_thesis.json`` (ResNet stages at
the thesis's CIFAR-10/Imagenette widths 0.512/0.64/0.8/1.0) and ``subnet_search_vgg16.json``
(one key per VGG-16 conv layer, thesis widths). Widths between the trained levels work (channels
are ordered by importance) but lose accuracy, so the choices follow the trained levels.

Stages: a search-space key names a module path; a channel group belongs to the stage whose key
equals its root module's path or is a dotted prefix of it (the longest such key wins). For the
zoo's ResNets the keys are the top-level modules ``conv1`` (the stem, which also sets the first
stage's residual stream), ``layer1``, ``layer2``, ``layer3``; for VGG/AlexNet ``features`` and
``classifier``, or finer keys such as ``features.0``. Groups of no stage keep their full width;
a key that matches no group is an error listing the model's stages.

Budgets: ``max_macs`` (a fraction of the full network's MACs if <= 1, else absolute MACs) and
``max_latency_ms``. They are Optuna constraints (``trial.set_constraint`` on Optuna >= 5, else the
samplers' ``constraints_func``; the values ``[macs / cap - 1, latency / cap - 1]`` are also in
``trial.user_attrs["constraint"]``, feasible when <= 0), so the samplers steer towards feasible
configurations. An infeasible configuration is not evaluated (accuracy recorded as 0) and never
enters the returned front.

Example:
    >>> result = search_subnets("runs/best/elastic.pt", data="digits", max_macs=0.5, n_trials=200, export_dir="runs/subnet")
    >>> result.best        # {"widths": {"conv1": 0.75, ...}, "macs": ..., "accuracy": ..., ...}
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import optuna

from ..device import resolve_device
from ..elastic import ElasticModel
from ..subnet import (
    SubnetEvaluator,
    evaluate_subnet,
    export_subnet,
    latency_budget,
    macs_budget,
    model_stages,
    search_data,
    stage_groups,
    stage_level,
)
from ._space import SpaceLike, find_search_space, load_search_space, suggest
from ._storage import open_storage
from ._study import (
    SeededNSGAIISampler,
    SeededTPESampler,
    create_or_load_study,
    make_sampler,
    optuna_verbosity,
    parse_objectives,
    save_plots,
)

__all__ = ["SubnetSearchResult", "search_subnets", "stage_groups", "stage_level", "model_stages", "subnet_constraints"]

logger = logging.getLogger(__name__)

SUBNET_SPACE = "subnet_search.json"


def subnet_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """``constraints_func`` for samplers on Optuna < 5: the values a search stored (<= 0: feasible)."""
    return list(trial.user_attrs.get("constraint", [0.0]))


# ---------------------------------------------------------------------- result
@dataclass
class SubnetSearchResult:
    """What :func:`search_subnets` found.

    Attributes:
        front: feasible configurations not dominated in (accuracy max, MACs min), by MACs;
            each ``{"trial", "widths", "channels", "macs", "macs_ratio", "params", "accuracy",
            "latency_ms"}``.
        best: the most accurate feasible configuration (fewest MACs among ties), or None.
        study: the Optuna study (every trial, user attributes and constraints).
        uniform: the feasible uniform-width configurations (every stage at one width), for reference.
        full_macs, full_params: the full network's counts.
        trial_seconds: mean wall time of a trial that computed something new (cost and, when
            feasible, accuracy; repeated configurations come from the caches at no cost).
        exported: files written to ``export_dir``; plots: PNG plots written.
        elastic_model: the model, left at ``best`` with its BatchNorm statistics recalibrated.
    """

    front: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    study: optuna.Study
    uniform: list[dict[str, Any]]
    full_macs: int
    full_params: int
    trial_seconds: Optional[float]
    elastic_model: ElasticModel
    exported: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------- evaluation
def _pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated in (accuracy max, MACs min), one per configuration, by MACs."""
    unique: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        unique.setdefault(tuple(sorted(r["channels"].items())), r)
    rows = list(unique.values())
    front = [r for r in rows if not any(
        o["accuracy"] >= r["accuracy"] and o["macs"] <= r["macs"] and (o["accuracy"] > r["accuracy"] or o["macs"] < r["macs"])
        for o in rows)]
    return sorted(front, key=lambda r: (r["macs"], -r["accuracy"]))


def _row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {"trial": t.number, "widths": a["widths"], "channels": a["channels"], "macs": a["macs"],
            "macs_ratio": a["macs_ratio"], "params": a["params"], "accuracy": a["accuracy"], "latency_ms": a.get("latency_ms")}


_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5


class _SubnetObjective:
    """One trial: sample stage widths, count the cost, evaluate when within budget (else penalise)."""

    def __init__(self, ev: SubnetEvaluator, space: dict, objectives: Sequence[str], full: dict, macs_cap: float,
                 latency_cap: float) -> None:
        self.ev, self.space, self.objectives, self.full = ev, space, tuple(objectives), full
        self.macs_cap, self.latency_cap = macs_cap, latency_cap
        self.seconds: list[float] = []  # wall time of trials that computed something new

    def __call__(self, trial: optuna.Trial) -> Union[float, tuple[float, ...]]:
        ev = self.ev
        start, known = time.perf_counter(), len(ev.costs) + len(ev.accuracy)
        attrs = evaluate_subnet(ev, suggest(trial, self.space), macs_cap=self.macs_cap, latency_cap=self.latency_cap,
                                full=self.full)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if _SET_CONSTRAINT:
            for key, value in zip(("macs", "latency"), attrs["constraint"]):
                trial.set_constraint(key, value)
        value = {"accuracy": attrs["accuracy"], "macs": attrs["macs_ratio"], "params": attrs["params_ratio"],
                 "latency": attrs["latency_ms"]}
        if len(ev.costs) + len(ev.accuracy) > known:
            self.seconds.append(time.perf_counter() - start)
        values = tuple(float(value[o]) for o in self.objectives)
        return values[0] if len(values) == 1 else values


def _width_space(em: ElasticModel, source: SpaceLike) -> dict[str, dict[str, Any]]:
    """Load a per-stage width space and check it against the model (stages exist, values are widths)."""
    space = load_search_space(source)
    stage_groups(em, space)
    for key, spec in space.items():
        values = spec["_value"] if spec["_type"] == "choice" else spec["_value"][:2]
        if spec["_type"] == "randint" or any(isinstance(v, (bool, str)) or not 0 < v <= 1 for v in values):
            raise ValueError(f"search space {key!r}: {spec} must give widths, fractions in (0, 1]")
    return space


def _shared_choices(space: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """Widths every stage can take (the uniform configurations), when every key is a choice."""
    if not all(s["_type"] == "choice" for s in space.values()):
        return []
    return sorted(set.intersection(*[set(s["_value"]) for s in space.values()]))


def _collect(study: optuna.Study, em: ElasticModel, full: dict, seconds: list[float]) -> SubnetSearchResult:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [_row(t) for t in done if t.user_attrs.get("feasible")]
    best = max(feasible, key=lambda r: (r["accuracy"], -r["macs"]), default=None)
    uniform = {tuple(r["widths"].items()): r for r in feasible if len(set(r["widths"].values())) == 1}
    return SubnetSearchResult(_pareto(feasible), best, study, sorted(uniform.values(), key=lambda r: r["macs"]),
                              full["macs"], full["params"], statistics.fmean(seconds) if seconds else None, em)


# ---------------------------------------------------------------------- search
def search_subnets(
    checkpoint: Union[str, os.PathLike, ElasticModel],
    data: Optional[str] = None,
    *,
    data_root: Optional[str] = None,
    search_space: Optional[SpaceLike] = None,
    max_macs: Optional[float] = None,
    max_latency_ms: Optional[float] = None,
    n_trials: Optional[int] = 200,
    objectives: Union[str, Sequence[str]] = ("accuracy", "macs"),
    storage: Union[str, os.PathLike, "optuna.storages.BaseStorage", None] = None,
    study_name: Optional[str] = None,
    load_if_exists: bool = True,
    sampler: Union[str, "optuna.samplers.BaseSampler", None] = None,
    seed: Optional[int] = 0,
    calibrate_batches: int = 10,
    batch_size: Optional[int] = None,
    val_limit: Optional[int] = None,
    latency_batch_size: int = 1,
    latency_repeats: int = 20,
    enqueue_uniform: bool = True,
    device: str = "auto",
    export_dir: Union[str, os.PathLike, None] = None,
    plot_dir: Union[str, os.PathLike, None] = None,
    timeout: Optional[float] = None,
    quiet: bool = False,
    trust: bool = False,
) -> SubnetSearchResult:
    """Find per-stage widths of a trained elastic model that are accurate within a MACs/latency budget.

    Args:
        checkpoint: an ``elastic.pt`` (or a loaded ElasticModel).
        data: dataset name; default: the one the checkpoint was trained on (else ``digits``),
            split exactly as in training so that validation data stays held out.
        data_root: dataset directory (default: the checkpoint recipe's).
        search_space: NNI search space of per-stage width choices (default
            ``search_spaces/subnet_search.json``; see the module docstring for stages).
        max_macs: budget, a fraction of the full MACs if <= 1, else absolute MACs.
        max_latency_ms: budget on the export's latency measured on this device.
        n_trials: trials to run (seconds each on a CPU for the zoo's small models).
        objectives: from ``accuracy``, ``macs``, ``params``, ``latency`` (default accuracy vs MACs).
        storage: None (in memory, default), or any storage :func:`tune` accepts.
        study_name, load_if_exists: name and resume behaviour of a stored study.
        sampler, seed: ``tpe``, ``nsga2``, ``random`` or an Optuna sampler (default: TPE for one
            objective, NSGA-II for several), seeded.
        calibrate_batches, batch_size: BatchNorm recalibration on that many training batches
            (batch size default: the recipe's).
        val_limit: evaluate on the first ``val_limit`` validation samples only (large datasets).
        latency_batch_size, latency_repeats: latency measurement settings.
        enqueue_uniform: evaluate the uniform configurations (every stage at one width) first.
        device: ``auto``, ``cpu``, ``cuda``.
        export_dir: write the best subnet there: ``subnet.ts`` (TorchScript), ``subnet.state.pt``
            (weights + architecture, :func:`nni_elastic.load_compact`), ``subnet.json`` (its widths,
            channels, MACs, accuracy), plus plots.
        plot_dir: where PNG plots go (default: ``export_dir``; none without either).
        timeout: stop after this many seconds.
        quiet: no progress bar, nothing printed.
        trust: unpickle a model the checkpoint stores pickled (runs code from the file: only for
            files you wrote yourself).
    """
    objectives = parse_objectives(objectives)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"n_trials={n_trials!r} (--trials) must be a positive integer: every trial evaluates one "
                         f"configuration")
    dev = resolve_device(device)
    em = checkpoint if isinstance(checkpoint, ElasticModel) else ElasticModel.load(checkpoint, trust=trust)
    em = em.to(dev).eval()
    near = Path.cwd() if isinstance(checkpoint, ElasticModel) else Path(checkpoint).parent
    space = _width_space(em, search_space if search_space is not None else find_search_space(SUBNET_SPACE, near=near))
    name, calib, val = search_data(em, data, data_root, seed or 0, calibrate_batches, batch_size, val_limit, dev)
    ev = SubnetEvaluator(em, calib, val, dev, max_latency_ms is not None or "latency" in objectives, latency_batch_size,
                    latency_repeats)
    full = ev.cost({g: 1.0 for g in em.graph.names})
    objective = _SubnetObjective(ev, space, objectives, full, macs_budget(max_macs, full["macs"], "max_macs"),
                                 latency_budget(max_latency_ms))
    smallest = ev.cost(stage_level(em, {k: min(s["_value"]) if s["_type"] == "choice" else s["_value"][0]
                                        for k, s in space.items()}))
    if smallest["macs"] > objective.macs_cap:
        raise ValueError(f"max_macs={max_macs}: no configuration of the search space fits; the smallest has "
                         f"{smallest['macs']} MACs ({smallest['macs'] / full['macs']:.1%} of {full['macs']}), "
                         f"the budget is {objective.macs_cap:.0f}")

    sampler_obj = make_sampler(sampler, len(objectives), seed=seed, n_trials=n_trials)
    if not _SET_CONSTRAINT and sampler is None:  # Optuna < 5: constraints reach the samplers through constraints_func
        cls = SeededTPESampler if len(objectives) == 1 else SeededNSGAIISampler
        sampler_obj = cls(seed=seed, constraints_func=subnet_constraints)
    source = None if isinstance(checkpoint, ElasticModel) else str(Path(checkpoint).resolve())
    default_name = "subnet_search" if source is None else f"subnet_search_{Path(source).parent.name}"
    with optuna_verbosity(optuna.logging.WARNING):
        study = create_or_load_study(
            storage=open_storage(storage), storage_text=storage, study_name=study_name or default_name,
            objectives=objectives, sampler=sampler_obj, pruner=optuna.pruners.NopPruner(), load_if_exists=load_if_exists,
            attrs={"checkpoint": source, "max_macs": max_macs, "max_latency_ms": max_latency_ms, "data": name, "space": space},
            match=("checkpoint", "max_macs", "max_latency_ms", "data", "space"))
        if enqueue_uniform and not study.trials:
            for w in _shared_choices(space):
                study.enqueue_trial({k: w for k in space}, skip_if_exists=True)
        study.optimize(objective, n_trials=n_trials, timeout=timeout, show_progress_bar=not quiet)
    result = _collect(study, em, full, objective.seconds)
    if result.best is None:
        logger.warning("no configuration within the budget among %d trials", len(study.trials))
    else:
        ev.activate(stage_level(em, result.best["widths"]))
        if export_dir is not None:
            result.exported = export_subnet(em, result.best, Path(export_dir))
    out_plots = plot_dir if plot_dir is not None else export_dir
    if out_plots is not None:
        result.plots = save_plots(study, Path(out_plots) / "plots", objectives)
    if not quiet:
        for p in result.exported + result.plots:
            print(f"wrote: {p}")
    return result
