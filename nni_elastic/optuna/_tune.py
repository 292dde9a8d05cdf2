"""Tune a recipe's thresholds with an Optuna study: one trial = one ``run_recipe`` with the trial's overrides.

Objectives (``objectives=``), each summarised over the levels a ``metric`` selects:

- ``accuracy`` (maximise): validation accuracy. ``metric="mean"`` (default) averages it over the
  levels, since an elastic model is only as useful as its levels together; ``"largest"`` takes
  the full network, ``"smallest"`` the core.
- ``macs`` / ``params`` (minimise): the same levels' MACs / parameters as a fraction of the
  largest level's (the full network in every shipped recipe), averaged likewise. They only vary
  when the search space changes the level widths (``elastic.widths``), which the shipped spaces do.
- ``latency`` (minimise): the same levels' measured latency in ms (batch 1, current device).

Single objective: after every strategy step the trial reports the validation accuracy of the
level that step trained (``trial.report(acc, step_index)``); the pruner (median by default) may
stop it (``optuna.TrialPruned``). Multi-objective studies cannot prune (Optuna's pruners are
single-objective); ``study.best_trials`` is their Pareto front.

Every trial writes ``<output_dir>/trial_<number>/`` (``elastic.pt``, ``levels.json``, plot) and
stores user attributes: ``accuracy``, ``macs``, ``macs_ratio``, ``params``, ``params_ratio``,
``latency_ms`` (the summaries), ``level_accuracy``, ``level_macs``, ``level_params``,
``level_latency_ms``, ``widths`` (per level), ``step_accuracy``, ``compute_full_epochs``,
``checkpoint`` and ``output``.

Example:
    >>> study = tune("strategies/prune_and_grow/digits.yaml", n_trials=20, storage="sqlite:///runs/pg.db",
    ...              study_name="pg-digits", objectives=("accuracy", "macs"))
    >>> front = study.best_trials     # Pareto front; open it with: optuna-dashboard sqlite:///runs/pg.db
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import optuna

from ..reporting import LEVEL_SUMMARIES, summarize_levels

from ..config import Recipe, apply_overrides, load_recipe, recipe_from_dict
from ._space import SearchSpaceError, SpaceLike, default_search_space, find_search_space, load_search_space, pin, suggest
from ._storage import dashboard_command, default_storage, fail_running_trials, open_storage, storage_label
from ._study import create_or_load_study, make_pruner, make_sampler, optuna_verbosity, parse_objectives, save_plots

__all__ = ["tune", "METRICS", "summarize_levels"]

logger = logging.getLogger(__name__)

METRICS = LEVEL_SUMMARIES
RecipeLike = Union[str, os.PathLike, Recipe]


_OBJECTIVE_VALUE = {"accuracy": "accuracy", "macs": "macs_ratio", "params": "params_ratio", "latency": "latency_ms"}


def _load(recipe: RecipeLike, overrides: Mapping[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe_from_dict(apply_overrides(recipe.to_dict(), overrides), source=recipe.source)
    return load_recipe(recipe, overrides)


def _probe(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One valid value per key (first choice, lower bound): loading the recipe with it checks the keys."""
    return {k: s["_value"][0] for k, s in space.items()}


@dataclass
class RecipeObjective:
    """The trial function: sample the space, run the recipe with those overrides, return the objectives.

    A plain picklable object so that worker processes can run it.
    """

    recipe: RecipeLike
    space: dict
    overrides: dict
    objectives: tuple
    metric: str
    output_dir: str
    quiet: bool = True
    exports: bool = False

    def __call__(self, trial: optuna.Trial) -> Union[float, tuple[float, ...]]:
        from ..runner import run_recipe

        params = suggest(trial, self.space)
        recipe = _load(self.recipe, {**self.overrides, **params})
        out = Path(self.output_dir) / f"trial_{trial.number:04d}"
        trial.set_user_attr("output", str(out))
        single = len(self.objectives) == 1
        steps: dict[str, float] = {}

        def on_step_end(info: Any) -> None:
            if info.val_accuracy is None:
                return
            steps[info.name] = float(info.val_accuracy)
            if single:  # Optuna's report/should_prune exist for single-objective studies only
                trial.report(float(info.val_accuracy), info.index)
                if trial.should_prune():
                    trial.set_user_attr("step_accuracy", steps)
                    raise optuna.TrialPruned(f"pruned after step {info.name} (val accuracy {info.val_accuracy:.4f})")

        result = run_recipe(recipe, output=out, quiet=self.quiet, exports=self.exports, on_step_end=on_step_end)
        rows = result.rows
        summary = summarize_levels(rows, self.metric)
        attrs = {
            **summary,
            "level_accuracy": [r["accuracy"] for r in rows],
            "level_macs": [r["macs"] for r in rows],
            "level_params": [r["params"] for r in rows],
            "level_latency_ms": [r.get("latency_ms") for r in rows],
            "widths": [r["width"] for r in rows],
            "step_accuracy": steps,
            "compute_full_epochs": result.compute.get("full_epochs"),
            "checkpoint": str(out / "elastic.pt"),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        values = tuple(float(summary[_OBJECTIVE_VALUE[o]]) for o in self.objectives)
        return values[0] if single else values


@dataclass
class _WorkerSpec:
    study_name: str
    storage: str
    sampler: Any
    pruner: Any
    seed: Optional[int]
    n_trials_total: int
    objective: RecipeObjective
    timeout: Optional[float]
    catch: tuple
    heartbeat_interval: Optional[int]
    grace_period: Optional[int]
    threads: int
    quiet: bool


def _worker(spec: _WorkerSpec, index: int, n_trials: int) -> None:
    """One worker process: open the storage, load the study, run its share of trials."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(spec.threads)
    storage = open_storage(spec.storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period)
    if isinstance(spec.sampler, optuna.samplers.BaseSampler):
        sampler = spec.sampler
        if index:
            sampler.reseed_rng()  # a pickled copy would otherwise propose what worker 0 proposes
    else:
        seed = None if spec.seed is None else spec.seed + index
        sampler = make_sampler(spec.sampler, len(spec.objective.objectives), seed=seed, n_trials=spec.n_trials_total)
    study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=spec.pruner)
    with optuna_verbosity(optuna.logging.WARNING) if spec.quiet else contextlib.nullcontext():
        study.optimize(spec.objective, n_trials=n_trials, timeout=spec.timeout, catch=spec.catch, gc_after_trial=True)


def _shares(n_trials: int, workers: int) -> list[int]:
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def _run_workers(study: optuna.Study, spec: _WorkerSpec, n_trials: int, workers: int) -> None:
    """Run ``n_trials`` trials split over ``workers`` spawned processes on one storage."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    before = {t.number for t in study.get_trials(deepcopy=False, states=finished)}
    ctx = multiprocessing.get_context("spawn")  # fork after torch/OpenMP start-up can deadlock
    procs = [ctx.Process(target=_worker, args=(spec, i, share), name=f"nni-elastic-optuna-{i}")
             for i, share in enumerate(_shares(n_trials, workers)) if share]
    from tqdm.auto import tqdm

    bar = tqdm(total=n_trials, desc=f"{study.study_name} ({len(procs)} workers)", disable=spec.quiet, dynamic_ncols=True)
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            done = len([t for t in study.get_trials(deepcopy=False, states=finished) if t.number not in before])
            bar.update(min(done, n_trials) - bar.n)
    finally:
        for p in procs:
            p.join()
        bar.close()
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker process(es) {failed} exited with an error (traceback above); finished trials "
                           f"are kept in the storage: run the same command again to continue")


def tune(
    recipe: RecipeLike,
    n_trials: Optional[int] = 20,
    *,
    search_space: Optional[SpaceLike] = None,
    storage: Union[str, os.PathLike, "optuna.storages.BaseStorage", None] = None,
    study_name: Optional[str] = None,
    objectives: Union[str, Sequence[str]] = ("accuracy",),
    metric: str = "mean",
    sampler: Union[str, "optuna.samplers.BaseSampler", None] = None,
    pruner: Union[str, "optuna.pruners.BasePruner", None] = "auto",
    output_dir: Union[str, os.PathLike, None] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    load_if_exists: bool = True,
    workers: int = 1,
    timeout: Optional[float] = None,
    seed: Optional[int] = None,
    quiet: bool = False,
    plots: bool = True,
    exports: bool = False,
    heartbeat_interval: Optional[int] = 60,
    grace_period: Optional[int] = None,
    fail_running: bool = False,
    catch: tuple = (ValueError,),
) -> optuna.Study:
    """Run an Optuna study over a recipe's thresholds; returns the study (``study.best_trials``: Pareto front).

    Args:
        recipe: a recipe YAML path (or a loaded :class:`~nni_elastic.config.Recipe`).
        n_trials: trials to run in this call (added to those a resumed study already has).
        search_space: an NNI search space file or mapping; default
            ``search_spaces/<method>_<recipe stem>.json`` (see :mod:`nni_elastic.optuna._space`).
        storage: ``sqlite:///...`` (default ``sqlite:///runs/<study_name>.db``), any RDB URL, a
            journal file (``journal:///runs/x.log`` or a ``.log`` path) or a storage object.
        study_name: default ``<method>_<recipe stem>``.
        objectives: names from ``accuracy``, ``macs``, ``params``, ``latency`` (tuple or
            ``"accuracy,macs"``); one gives a single-objective study, several a Pareto study.
        metric: which levels the objectives summarise: ``mean`` (default), ``largest``, ``smallest``.
        sampler: ``tpe``, ``nsga2``, ``random`` or any Optuna sampler (default: TPE for one
            objective, NSGA-II for several).
        pruner: ``auto`` (median for one objective, none for several), ``median``, ``hyperband``,
            None, or an Optuna pruner; a pruner with several objectives is an error.
        output_dir: trial outputs go to ``<output_dir>/trial_<number>/`` and plots to
            ``<output_dir>/plots/`` (default ``runs/optuna/<study_name>``).
        overrides: recipe overrides for every trial (``{"data.limit": 200}``); a key also in the
            search space is pinned (removed from the search).
        load_if_exists: continue a study of the same name in the storage (resume after an
            interruption: finished trials are kept; see :mod:`nni_elastic.optuna._storage`).
        workers: processes working on the study at once, each running its share of ``n_trials``
            (needs a storage URL or journal path: SQLite works, a journal file is recommended).
        timeout: stop starting trials after this many seconds.
        seed: seed of the default samplers.
        quiet: no progress bars, no Optuna log lines, nothing printed.
        plots: save PNG plots (history, Pareto front, importances) and print their paths.
        exports: also write compact exports of every level in each trial.
        heartbeat_interval, grace_period: RDB heartbeats; a trial silent for ``grace_period``
            seconds (a killed process) is marked FAIL when the study next runs (None: off).
        fail_running: first mark every RUNNING trial FAIL (trials of a killed process on a journal
            storage; only when no other process works on the study).
        catch: exceptions that fail a trial without stopping the study (an invalid combination
            of thresholds raises ``ValueError``).

    Example:
        >>> study = tune("strategies/prune_and_grow/digits.yaml", n_trials=20, objectives=("accuracy", "macs"),
        ...              storage="sqlite:///runs/pg.db", study_name="pg-digits")
    """
    objectives = parse_objectives(objectives)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {list(METRICS)}")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"n_trials={n_trials!r} must be a positive integer")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    if workers > 1 and n_trials is None:
        raise ValueError("workers > 1 needs n_trials (each worker runs its share)")
    overrides = dict(overrides or {})
    base = _load(recipe, overrides)
    source = Path(recipe) if not isinstance(recipe, Recipe) else (Path(recipe.source) if recipe.source else None)
    if search_space is None:
        if source is None:
            raise ValueError("a Recipe object without a source file needs search_space=<file.json>")
        search_space = find_search_space(default_search_space(base.method, source.stem), near=source.parent)
    space = load_search_space(search_space)
    space = pin(space, overrides)
    if not space:
        raise SearchSpaceError(f"search space {str(search_space)!r}: every key is pinned by overrides {sorted(overrides)}; "
                               f"nothing left to search")
    _load(recipe, {**overrides, **_probe(space)})  # every key must be a recipe key (RecipeError names it)
    stem = source.stem if source is not None else "recipe"
    study_name = study_name or f"{base.method}_{stem}"
    storage = default_storage(study_name) if storage is None else storage
    if workers > 1 and not isinstance(storage, (str, os.PathLike)):
        raise ValueError("workers > 1 needs a storage URL or journal path that every process can open, "
                         "e.g. journal:///runs/study.log or sqlite:///runs/study.db")
    output_dir = Path(output_dir) if output_dir is not None else Path("runs/optuna") / study_name
    sampler_obj = make_sampler(sampler, len(objectives), seed=seed, n_trials=n_trials)
    pruner_obj = make_pruner(pruner, objectives)
    opened = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    attrs = {"recipe": str(source.resolve()) if source else None, "metric": metric,
             "search_space": str(search_space) if not isinstance(search_space, Mapping) else "inline",
             "overrides": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in overrides.items()}}
    with optuna_verbosity(optuna.logging.WARNING) if quiet else contextlib.nullcontext():
        study = create_or_load_study(storage=opened, storage_text=storage, study_name=study_name, objectives=objectives,
                                     sampler=sampler_obj, pruner=pruner_obj, load_if_exists=load_if_exists, attrs=attrs,
                                     match=("recipe", "metric"))
    if study.user_attrs.get("overrides", attrs["overrides"]) != attrs["overrides"]:
        logger.warning("study %s was run with overrides %s, now %s: its trials mix both settings", study_name,
                       study.user_attrs["overrides"], attrs["overrides"])
    if fail_running:
        failed = fail_running_trials(study)
        if failed:
            logger.warning("marked trials %s (left RUNNING by an interrupted run) as FAIL", failed)
    recipe_arg = recipe if isinstance(recipe, Recipe) else str(Path(recipe).resolve())
    objective = RecipeObjective(recipe_arg, space, overrides, objectives, metric, str(output_dir.resolve()),
                                quiet=quiet or workers > 1, exports=exports)
    logger.info("study %s in %s: %s trials, objectives %s, space %s", study_name, storage_label(storage), n_trials,
                objectives, sorted(space))
    with optuna_verbosity(optuna.logging.WARNING) if quiet else contextlib.nullcontext():
        if workers == 1:
            study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=catch, gc_after_trial=True,
                           show_progress_bar=not quiet)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            spec = _WorkerSpec(study_name, os.fspath(storage), sampler, pruner_obj, seed, n_trials, objective, timeout,
                               catch, heartbeat_interval, grace_period, threads, quiet)
            _run_workers(study, spec, n_trials, workers)
    if plots:
        written = save_plots(study, output_dir / "plots", objectives)
        study.set_user_attr("plots", [str(p) for p in written])
        if not quiet:
            for p in written:
                print(f"plot: {p}")
    if not quiet and dashboard_command(storage):
        print(f"dashboard: {dashboard_command(storage)}")
    return study
