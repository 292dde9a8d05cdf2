"""What tuning and subnet-search studies share: objectives, samplers, pruners, study creation, plots."""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import optuna

from ._storage import storage_label

__all__ = ["OBJECTIVES", "SAMPLERS", "parse_objectives", "make_sampler", "make_pruner", "create_or_load_study", "save_plots"]

logger = logging.getLogger(__name__)

# objective name -> direction
OBJECTIVES = {"accuracy": "maximize", "macs": "minimize", "params": "minimize", "latency": "minimize"}
#: sampler names -> ``optuna.samplers`` classes (any other class name of ``optuna.samplers`` works too)
SAMPLERS = {
    "tpe": "TPESampler", "nsga2": "NSGAIISampler", "nsga3": "NSGAIIISampler", "random": "RandomSampler",
    "cmaes": "CmaEsSampler", "qmc": "QMCSampler", "gp": "GPSampler", "bruteforce": "BruteForceSampler",
}
_EXTRA_PACKAGES = {"CmaEsSampler": "cmaes"}
PRUNERS = ("auto", "median", "hyperband", "none")


def parse_objectives(objectives: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``("accuracy", "macs")`` or ``"accuracy,macs"`` -> a validated tuple of objective names."""
    names = tuple(o.strip() for o in objectives.split(",")) if isinstance(objectives, str) else tuple(objectives)
    if not names:
        raise ValueError(f"objectives must name at least one of {list(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; allowed objectives: {list(OBJECTIVES)} "
                             f"(e.g. ('accuracy',) or ('accuracy', 'macs'))")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives {names} name an objective twice")
    return names


def directions(objectives: Sequence[str]) -> list[str]:
    return [OBJECTIVES[o] for o in objectives]


class _TrialSeeded:
    """Sampler mixin: before every trial, reseed the random streams from ``(seed, trial number)``.

    One seeded stream per sampler object repeats itself: a study resumed with the same seed, or two
    processes on one study with the same seed, would re-sample the parameters of earlier trials.
    Trial numbers are unique in a study (the storage hands them out), so every trial draws its own
    stream, and a study stays reproducible from its seed.
    """

    _ne_seed: Optional[int] = None

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._ne_seed is not None:
            state = np.random.SeedSequence([self._ne_seed, trial.number]).generate_state(2)
            for rng_owner, value in zip((self, getattr(self, "_random_sampler", None)), state):
                rng = getattr(rng_owner, "_rng", None)
                if rng is not None:
                    rng.rng.seed(int(value))
        super().before_trial(study, trial)  # type: ignore[misc]


class SeededTPESampler(_TrialSeeded, optuna.samplers.TPESampler):
    def __init__(self, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._ne_seed = seed


class SeededNSGAIISampler(_TrialSeeded, optuna.samplers.NSGAIISampler):
    def __init__(self, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._ne_seed = seed


class SeededRandomSampler(_TrialSeeded, optuna.samplers.RandomSampler):
    def __init__(self, seed: Optional[int] = None) -> None:
        super().__init__(seed=seed)
        self._ne_seed = seed


SEEDED_SAMPLERS = {optuna.samplers.TPESampler: SeededTPESampler, optuna.samplers.NSGAIISampler: SeededNSGAIISampler,
                   optuna.samplers.RandomSampler: SeededRandomSampler}


def make_sampler(sampler: Union[str, optuna.samplers.BaseSampler, None], n_objectives: int = 1, *,
                 seed: Optional[int] = None, n_trials: Optional[int] = None, kwargs: Optional[Mapping[str, Any]] = None,
                 constraints_func: Optional[Any] = None) -> optuna.samplers.BaseSampler:
    """A sampler from a name, an instance (as is), or None: the one sampler factory of the Optuna and NNI adapters.

    Names: ``tpe``, ``nsga2``, ``nsga3``, ``random``, ``cmaes`` (needs ``cmaes``), ``qmc``, ``gp``,
    ``bruteforce``, or a class name of ``optuna.samplers``. None: TPE for one objective, NSGA-II for
    several, its population ``n_trials // 4`` clipped to [4, 50] so that a short study still runs
    several generations. ``kwargs`` are the sampler's own arguments (unknown ones are an error);
    ``constraints_func`` is passed where the sampler takes one. A seeded TPE, NSGA-II or random
    sampler draws each trial from ``(seed, trial number)``: resumed studies and parallel workers
    never repeat a draw.
    """
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if sampler is None or sampler == "auto":
        sampler = "tpe" if n_objectives == 1 else "nsga2"
    cls_name = SAMPLERS.get(sampler.lower(), sampler)
    cls = getattr(optuna.samplers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)) or cls_name.startswith("Base"):
        raise ValueError(f"unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)}, a class name of "
                         f"optuna.samplers (e.g. TPESampler) or an optuna.samplers.BaseSampler")
    package = _EXTRA_PACKAGES.get(cls_name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ImportError(f"sampler {sampler!r} needs the {package!r} package: pip install {package}")
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{unknown} are not arguments of optuna.samplers.{cls_name}; its "
                         f"arguments: {sorted(p for p in params if p != 'self')}")
    if seed is not None and "seed" in params:
        kwargs.setdefault("seed", seed)
    if constraints_func is not None and "constraints_func" in params:
        kwargs.setdefault("constraints_func", constraints_func)
    if cls_name == "NSGAIISampler":
        kwargs.setdefault("population_size", max(4, min(50, (n_trials or 200) // 4)))
    if kwargs.get("seed") is not None:
        cls = SEEDED_SAMPLERS.get(cls, cls)
    return cls(**kwargs)


def make_pruner(pruner: Union[str, optuna.pruners.BasePruner, None], objectives: Sequence[str]) -> optuna.pruners.BasePruner:
    """A trial pruner: ``auto`` (median for one objective, none for several), ``median``,
    ``hyperband``, ``none``/None, or an instance. Optuna's pruners do not support multi-objective
    studies, so asking for one there is an error."""
    multi = len(objectives) > 1
    if pruner is None or pruner == "none" or isinstance(pruner, optuna.pruners.NopPruner):
        return optuna.pruners.NopPruner()
    if pruner == "auto":
        return optuna.pruners.NopPruner() if multi else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if not isinstance(pruner, optuna.pruners.BasePruner) and pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; use one of {list(PRUNERS)}, None or an optuna.pruners.BasePruner")
    if multi:
        name = pruner if isinstance(pruner, str) else type(pruner).__name__
        raise ValueError(
            f"pruner {name!r} cannot be used with the multi-objective study {tuple(objectives)}: Optuna's trial pruners "
            f"support single-objective studies only. Use pruner=None (--pruner none) and budgets/constraints, or "
            f"a single objective"
        )
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)


def create_or_load_study(
    *,
    storage: Any,
    storage_text: Any,
    study_name: str,
    objectives: Sequence[str],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    load_if_exists: bool,
    attrs: Mapping[str, Any],
    match: Sequence[str] = (),
) -> optuna.Study:
    """Create the study (or load it when ``load_if_exists``), checking that an existing one was
    made for the same objectives and the same ``attrs[k]`` for every ``k`` in ``match`` (results
    of different settings must not mix in one front); ``attrs`` are stored as study user
    attributes on creation."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions(objectives),
                                    sampler=sampler, pruner=pruner, load_if_exists=load_if_exists)
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(f"study {study_name!r} already exists in {storage_label(storage_text)}; pass "
                         f"load_if_exists=True to continue it, or another study name") from None
    stored = study.user_attrs.get("objectives")
    wanted = [d.name.lower() for d in study.directions]
    if (stored is not None and list(stored) != list(objectives)) or wanted != directions(objectives):
        raise ValueError(f"study {study_name!r} in {storage_label(storage_text)} was created for objectives "
                         f"{stored or wanted}, not {list(objectives)}; use another study name")
    for key in match:
        if stored is not None and key in study.user_attrs and study.user_attrs[key] != attrs[key]:
            raise ValueError(f"study {study_name!r} in {storage_label(storage_text)} was run with {key}="
                             f"{study.user_attrs[key]!r}, not {attrs[key]!r}; use another study name")
    if stored is None:
        for key, value in {"objectives": list(objectives), **attrs}.items():
            study.set_user_attr(key, value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))  # shown by optuna-dashboard and the plots
    return study


@contextlib.contextmanager
def optuna_verbosity(level: int) -> Iterator[None]:
    """Temporarily set Optuna's log level (its per-trial INFO lines)."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _save(ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = ax.flat[0].get_figure() if hasattr(ax, "flat") else ax.get_figure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def save_plots(study: optuna.Study, out_dir: Union[str, Path], objectives: Sequence[str]) -> list[Path]:
    """PNG plots of a study with ``optuna.visualization.matplotlib``; returns the paths written.

    Multi-objective: the Pareto front (2 or 3 objectives) and one optimisation history per
    objective. Single objective: the optimisation history and the intermediate values (when
    trials reported any). Both: parameter importances, once two trials completed and the
    importances are computable (they need some variation in parameters and values).
    """
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    out = Path(out_dir)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return []
    multi = len(objectives) > 1
    jobs: list[tuple[str, Any]] = []
    if multi:
        if len(objectives) in (2, 3):
            jobs.append(("pareto_front.png", lambda: vis.plot_pareto_front(study, target_names=list(objectives))))
        for i, name in enumerate(objectives):
            jobs.append((f"history_{name}.png", lambda i=i, name=name: vis.plot_optimization_history(
                study, target=lambda t: t.values[i], target_name=name)))
    else:
        jobs.append(("history.png", lambda: vis.plot_optimization_history(study, target_name=objectives[0])))
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            jobs.append(("intermediate_values.png", lambda: vis.plot_intermediate_values(study)))
    if len(done) >= 2:
        if multi:
            for i, name in enumerate(objectives):
                jobs.append((f"param_importances_{name}.png", lambda i=i, name=name: vis.plot_param_importances(
                    study, target=lambda t: t.values[i], target_name=name)))
        else:
            jobs.append(("param_importances.png", lambda: vis.plot_param_importances(study, target_name=objectives[0])))
    written = []
    for name, draw in jobs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                written.append(_save(draw(), out / name))
            except Exception as exc:  # a plot that cannot be drawn (e.g. zero variance) is skipped, not fatal
                logger.info("plot %s skipped: %s", name, exc)
                import matplotlib.pyplot as plt

                plt.close("all")
    return written
