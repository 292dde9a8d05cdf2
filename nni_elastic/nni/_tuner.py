"""``OptunaTuner``: an NNI tuner that asks an Optuna study for every trial's parameters.

NNI sends the search space (``search_spaces/*.json``, NNI format) and asks for parameters; the
tuner translates the space with :func:`nni_elastic.optuna.to_distributions` (the same translation
``nni-elastic tune`` uses: ``choice``, ``randint``, ``uniform``, ``quniform``, ``loguniform``),
asks its study (``study.ask(distributions)``) and returns the values, NNI-valid. A trial's final
result is told to the study (``study.tell``): the ``"default"`` metric for one objective, or
the metric keys of ``objectives`` (e.g. ``["default", "macs"]``) with their ``directions`` for a
Pareto study. A trial that fails, is killed or ends without a final result is told ``FAIL``.

The study lives in an Optuna storage (default: SQLite ``optuna.db`` in the experiment's
directory, ``~/nni-experiments/<id>/optuna.db``; outside an experiment ``~/nni-elastic/optuna.db``),
so ``optuna-dashboard sqlite:////home/me/nni-experiments/<id>/optuna.db`` shows an NNI
experiment, and ``nnictl resume`` continues the same study (trials left ``RUNNING`` by the
interrupted experiment are marked ``FAIL``; results NNI re-imports are not added twice).

Use it in an experiment config without registering anything (the package is importable)::

    tuner:
      className: nni_elastic.nni.OptunaTuner
      codeDirectory: ..
      classArgs: {sampler: tpe, seed: 0}

or, after ``nni-elastic nni register`` (``nnictl algo register --meta ...``), by name::

    tuner:
      name: OptunaTuner
      classArgs: {sampler: nsga2, objectives: [default, macs], directions: [maximize, minimize]}

NNI sends intermediate results to assessors only, never to tuners, so Optuna's trial pruners do
not apply here: use an NNI assessor (``assessor: {name: Medianstop}``) for early stopping.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import optuna
from nni.tuner import Tuner

from ..optuna import load_search_space, open_storage, to_distributions
from ..optuna._storage import resolve_storage
from ..optuna._study import SAMPLERS, make_sampler

__all__ = ["OptunaTuner", "SAMPLERS", "default_storage_path"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


def _experiment_dir() -> Optional[Path]:
    """The experiment's directory, from the dispatcher's log directory (``<experiment dir>/log``)."""
    log_dir = os.environ.get("NNI_LOG_DIRECTORY")
    return Path(log_dir).parent if log_dir else None


def default_storage_path() -> Path:
    """``<experiment dir>/optuna.db`` inside an NNI experiment, else ``~/nni-elastic/optuna.db``."""
    exp = _experiment_dir()
    return (exp if exp is not None else Path.home() / "nni-elastic") / "optuna.db"


def _resolve_storage(storage: Optional[str]) -> str:
    """A storage URL with ``~`` expanded and relative file paths anchored at the experiment's directory
    (the dispatcher runs in its log directory, which nobody would guess)."""
    if storage is None:
        path = default_storage_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return resolve_storage(storage, _experiment_dir() or Path.cwd())


def _make_sampler(name: str, seed: Optional[int], kwargs: Mapping[str, Any],
                  constrained: bool) -> optuna.samplers.BaseSampler:
    # Optuna < 5: constraints reach samplers through constraints_func
    func = _stored_constraints if constrained and not hasattr(optuna.trial.Trial, "set_constraint") else None
    try:
        return make_sampler(name, seed=seed, kwargs=kwargs, constraints_func=func)
    except (ValueError, ImportError) as exc:
        where = "sampler_kwargs" if "not arguments" in str(exc) else "sampler"
        raise type(exc)(f"OptunaTuner classArgs.{where}: {exc}") from None


def _stored_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """``constraints_func`` on Optuna < 5: the values :meth:`OptunaTuner.receive_trial_result` stored."""
    return list(trial.user_attrs.get("constraint", [0.0]))


def _as_list(value: Union[str, Sequence[str], None], name: str) -> Optional[list[str]]:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"OptunaTuner classArgs.{name}: {value!r} must be a metric key or a list of them")
    return items


class OptunaTuner(Tuner):
    """NNI tuner backed by an Optuna study (ask/tell), single- or multi-objective.

    Args (``classArgs`` in the experiment config):
        sampler: ``tpe`` (default), ``nsga2``, ``nsga3``, ``random``, ``cmaes`` (needs ``cmaes``),
            ``qmc``, ``gp``, ``bruteforce``, or any class name of ``optuna.samplers``.
        sampler_kwargs: keyword arguments of the sampler (e.g. ``{n_startup_trials: 5}``).
        seed: seed of the sampler.
        objectives: metric keys to optimise (default ``["default"]``); several make a Pareto study.
        directions: ``maximize``/``minimize`` per objective (default: ``optimize_mode`` for
            ``default``, ``minimize`` for any other key such as ``macs`` or ``latency_ms``).
        optimize_mode: NNI's name for the direction of ``default`` (``maximize``, default).
        constraints: metric keys that are constraints, feasible when <= 0 (e.g. ``[violation]``
            from the subnet trial); Optuna's samplers then prefer feasible trials.
        storage: an Optuna storage: ``sqlite:///path.db`` (relative paths and ``~`` resolve
            against the experiment's directory), a ``.db``/``.log`` path, an RDB URL (see
            :func:`nni_elastic.optuna.open_storage`). Default ``<experiment dir>/optuna.db``.
        study_name: default ``nni-<experiment id>``.
        load_if_exists: continue a study of that name (default True; ``nnictl resume`` needs it).
    """

    def __init__(self, sampler: str = "tpe", sampler_kwargs: Optional[Mapping[str, Any]] = None,
                 seed: Optional[int] = None,
                 objectives: Union[str, Sequence[str], None] = None, directions: Union[str, Sequence[str], None] = None,
                 optimize_mode: str = "maximize", constraints: Union[str, Sequence[str], None] = None,
                 storage: Optional[str] = None, study_name: Optional[str] = None, load_if_exists: bool = True) -> None:
        super().__init__()
        if optimize_mode not in DIRECTIONS:
            raise ValueError(f"OptunaTuner classArgs.optimize_mode: {optimize_mode!r} is not one of {list(DIRECTIONS)}")
        self.objectives = _as_list(objectives, "objectives") or ["default"]
        given = _as_list(directions, "directions")
        self.directions = given or [optimize_mode if o == "default" else "minimize" for o in self.objectives]
        if len(self.directions) != len(self.objectives) or any(d not in DIRECTIONS for d in self.directions):
            raise ValueError(f"OptunaTuner classArgs.directions: {directions!r} must give one of {list(DIRECTIONS)} "
                             f"for each objective {self.objectives}")
        self.constraints = _as_list(constraints, "constraints") or []
        self.sampler = _make_sampler(sampler, seed, sampler_kwargs or {}, bool(self.constraints))
        self.storage = _resolve_storage(storage)
        exp = _experiment_dir()
        self.study_name = study_name or f"nni-{exp.name if exp is not None else 'experiment'}"
        self.load_if_exists = load_if_exists
        self.study: Optional[optuna.Study] = None
        self.space: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}
        self._running: dict[int, optuna.trial.Trial] = {}  # NNI parameter id -> Optuna trial awaiting a result
        self._accept_customized_trials()  # results of trials added in the web UI reach receive_trial_result

    # ------------------------------------------------------------------ study
    def _open_study(self) -> optuna.Study:
        storage = open_storage(self.storage, heartbeat_interval=None)
        try:
            study = optuna.create_study(storage=storage, study_name=self.study_name, sampler=self.sampler,
                                        directions=self.directions, load_if_exists=self.load_if_exists)
        except optuna.exceptions.DuplicatedStudyError:
            raise ValueError(f"OptunaTuner: study {self.study_name!r} already exists in {self.storage}; set "
                             f"load_if_exists: true to continue it, or another study_name") from None
        wanted = [d.lower() for d in self.directions]
        if [d.name.lower() for d in study.directions] != wanted:
            raise ValueError(f"OptunaTuner: study {self.study_name!r} in {self.storage} has directions "
                             f"{[d.name.lower() for d in study.directions]}, not {wanted}; use another study_name")
        stale = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        for t in stale:  # left RUNNING by an interrupted experiment; this tuner is the study's only writer
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if stale:
            logger.warning("marked %d trial(s) left RUNNING by an earlier run as FAIL", len(stale))
        if "objectives" not in study.user_attrs:
            study.set_user_attr("objectives", list(self.objectives))
            study.set_user_attr("nni_experiment", _experiment_dir().name if _experiment_dir() else None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(self.objectives))
        logger.info("OptunaTuner: study %s in %s (dashboard: optuna-dashboard %s)", self.study_name, self.storage,
                    self.storage)
        return study

    # ------------------------------------------------------------------ NNI Tuner API
    def update_search_space(self, search_space: Mapping[str, Any]) -> None:
        """Translate the NNI space (errors name the key); the next trials sample from it."""
        self.space = load_search_space(search_space)
        self.distributions = to_distributions(self.space)
        if self.study is None:
            self.study = self._open_study()
        self.study.set_user_attr("search_space", self.space)

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> dict[str, Any]:
        """``study.ask(distributions)``: one value per key, of the type NNI's own tuners give."""
        if self.study is None:
            raise RuntimeError("OptunaTuner: generate_parameters before update_search_space")
        trial = self.study.ask(self.distributions)
        trial.set_user_attr("nni_parameter_id", parameter_id)
        self._running[parameter_id] = trial
        return {k: _plain(v) for k, v in trial.params.items()}

    def receive_trial_result(self, parameter_id: int, parameters: Mapping[str, Any], value: Any, **kwargs: Any) -> None:
        """Tell the study the trial's objectives (and constraints; user attributes ``metric``: every number
        reported, ``nni_trial_job_id``: the NNI trial that ran these parameters)."""
        metric = value if isinstance(value, Mapping) else {"default": value}
        trial = self._running.pop(parameter_id, None)
        if trial is None:  # a trial added in the web UI (or re-sent): record it as a finished trial
            self._add_finished(parameters, metric, kwargs.get("trial_job_id"))
            return
        if kwargs.get("trial_job_id"):
            trial.set_user_attr("nni_trial_job_id", kwargs["trial_job_id"])
        trial.set_user_attr("metric", {k: v for k, v in metric.items() if _is_number(v)})  # one write, not one per key
        values = self._values(metric)
        if values is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self._set_constraints(trial, metric)
        self.study.tell(trial, values if len(values) > 1 else values[0])

    def trial_end(self, parameter_id: int, success: bool, **kwargs: Any) -> None:
        """A failed or killed trial is told FAIL; a successful one waits for its result (NNI may deliver
        it after the end event); one that never reports is told FAIL when the experiment ends."""
        if parameter_id not in self._running or success:
            return
        trial = self._running.pop(parameter_id)
        logger.info("trial with parameter id %s failed: told FAIL", parameter_id)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def import_data(self, data: Sequence[Mapping[str, Any]]) -> None:
        """Results NNI re-sends (``nnictl resume``, ``nnictl experiment import``) become finished trials,
        unless the study already holds a finished trial with the same parameters and values."""
        for entry in data:
            metric = entry["value"] if isinstance(entry["value"], Mapping) else {"default": entry["value"]}
            self._add_finished(entry["parameter"], metric, None)

    def _on_exit(self) -> None:
        self._fail_pending()

    def _on_error(self) -> None:
        self._fail_pending()

    # ------------------------------------------------------------------ helpers
    def _fail_pending(self) -> None:
        for parameter_id, trial in list(self._running.items()):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            self._running.pop(parameter_id)

    def _values(self, metric: Mapping[str, Any]) -> Optional[list[float]]:
        missing = [k for k in self.objectives if not _is_number(metric.get(k))]
        if missing:
            logger.warning("final result %s has no finite number under %s: trial told FAIL (objectives %s)",
                           dict(metric), missing, self.objectives)
            return None
        return [float(metric[k]) for k in self.objectives]

    def _set_constraints(self, trial: optuna.trial.Trial, metric: Mapping[str, Any]) -> None:
        if not self.constraints:
            return
        values = [float(metric[k]) if _is_number(metric.get(k)) else math.inf for k in self.constraints]
        trial.set_user_attr("constraint", values)  # read by constraints_func on Optuna < 5
        if hasattr(trial, "set_constraint"):
            for key, v in zip(self.constraints, values):
                trial.set_constraint(key, v)

    def _add_finished(self, parameters: Mapping[str, Any], metric: Mapping[str, Any], trial_job_id: Optional[str]) -> None:
        values = self._values(metric)
        params = {k: parameters[k] for k in self.distributions if k in parameters}
        if values is None or len(params) != len(self.distributions):
            logger.info("result for parameters %s not added to the study (keys or values do not match)", parameters)
            return
        for t in self.study.get_trials(deepcopy=False, states=_FINISHED):
            if t.params == params and t.values == values:
                return  # already there (a resumed experiment re-sends its results)
        attrs: dict[str, Any] = {"metric": {k: v for k, v in metric.items() if _is_number(v)}}
        if trial_job_id:
            attrs["nni_trial_job_id"] = trial_job_id
        try:
            self.study.add_trial(optuna.trial.create_trial(params=params, distributions=self.distributions,
                                                           values=values, user_attrs=attrs))
        except ValueError as exc:  # a value outside the space (edited in the web UI)
            logger.warning("result for parameters %s not added to the study: %s", parameters, exc)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """numpy scalars (from some samplers) -> Python numbers, which NNI serialises."""
    return v.item() if hasattr(v, "item") and callable(v.item) else v
