"""The strategy contract: typed options, one result type, checkpoints after named steps, a registry.

A strategy is one file: an options dataclass (its recipe ``strategy:`` section, declared with
:func:`~nni_elastic.options.option`), a :class:`Strategy` subclass naming it as ``Options``, and
``@register_strategy("name")``. The recipe runner, ``nni-elastic run``/``tune``, the NNI trial and
the Optuna studies then run it by name, with no code of their own for it. Base classes of the
same shape: Optuna's ``BaseSampler``, torch-pruning's ``BasePruner``; the registry follows timm's
``register_model``.

A strategy's ``fit`` runs its steps in order. After every step the whole state (elastic model and
strategy records) is written atomically to ``checkpoint_dir``; ``fit(..., resume=True)`` reloads it
and skips the finished steps. Every step seeds its own RNGs from the seed and its index, so a
resumed run computes exactly what an uninterrupted one does. :meth:`Strategy.run` returns what
every strategy produces, a :class:`StrategyResult`.

Example (a complete strategy; see README "Add a strategy")::

    @dataclass
    class TwoPhaseOptions:
        epochs: int = option(2, ge=0)

    @register_strategy("two_phase")
    class TwoPhase(Strategy):
        Options = TwoPhaseOptions

        def fit(self, model, train_data, val_data, *, resume=False, example_inputs=None) -> StrategyResult:
            train(model, train_data, val_data, replace(self.train, epochs=self.options.epochs))
            return StrategyResult(model=model, rows=[{"level": 0, "accuracy": evaluate(model, val_data)["accuracy"]}])
"""
from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .._registry import Registry
from ..budget import parse_levels
from ..elastic import BN_MODES, ElasticModel, check_widths
from ..graph import IMPORTANCES, UNSUPPORTED_MODES
from ..options import check_options, option, option_names
from ..training import TrainConfig

__all__ = [
    "Strategy", "StrategyResult", "ElasticOptions", "Step", "StepInfo", "ParameterGuard", "STRATEGIES",
    "register_strategy", "get_strategy", "list_strategies", "load_plugins", "first_batches", "example_from",
    "num_samples",
]

logger = logging.getLogger(__name__)

#: entry-point group through which installed packages add strategies (``pyproject.toml``:
#: ``[project.entry-points."nni_elastic.strategies"] my_method = "my_pkg.my_method"``)
ENTRY_POINT_GROUP = "nni_elastic.strategies"


def _check_importance(value: Any, label: str) -> None:
    if isinstance(value, str):
        try:
            IMPORTANCES.get(value)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None


def _check_level_widths(widths: Any, label: str) -> None:
    path = label.split(":")[0].split("=")[0]
    if not widths:
        raise ValueError(f"{label} must be a non-empty list of fractions in (0, 1], e.g. [0.25, 0.5, 1.0]")
    for i, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"{path}[{i}]: {w!r} must be a fraction in (0, 1]")
    for a, b in zip(widths, widths[1:]):
        if not b > a:
            raise ValueError(f"{path}: {list(widths)} must be strictly increasing (smallest level first)")


def _check_level_budgets(value: Any, label: str) -> None:
    if value is not None:
        parse_levels(value, where=label.split(":")[0].split("=")[0])


@dataclass
class ElasticOptions:
    """How a strategy wraps a model into levels (the recipe's ``elastic:`` section; see :class:`ElasticModel`).

    ``levels`` asks for levels by budget instead of uniform ``widths``: ``{macs: [0.1, 0.25, 0.4, 1.0]}``
    (fractions of the full network's MACs), ``{latency_ms: [...], batch_size: 64}`` (measured on the
    current device) or ``{widths: [...]}``; the strategy chooses per-group widths (:mod:`nni_elastic.budget`).
    """

    widths: list = option(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], check=_check_level_widths)
    levels: Optional[dict] = option(None, check=_check_level_budgets)
    importance: Union[str, Callable] = option("l1", check=_check_importance)
    bn: str = option("per_level", choices=BN_MODES)
    ignored_layers: list = option(default_factory=list)
    round_to: int = option(1, gt=0)
    unsupported: str = option("error", choices=UNSUPPORTED_MODES)

    def __post_init__(self) -> None:
        self.widths = check_widths(self.widths)
        self.ignored_layers = list(self.ignored_layers)
        check_options(self)


@dataclass
class StrategyResult:
    """What :meth:`Strategy.fit` (and :meth:`Strategy.run`) returns, for every strategy.

    Attributes:
        elastic_model: the levels as one :class:`ElasticModel` (None when the strategy has none).
        rows: one row per level or complexity stage: ``level``, ``width``, ``macs``, ``params``,
            ``accuracy``, ``latency_ms`` where known.
        compute: training compute (``full_epochs``: in full-model epochs; ``mac_samples``).
        checkpoints: one record per checkpoint the strategy wrote (path and metadata).
        records: the strategy's own results (plain data; written to ``levels.json``).
        model: the trained plain model, when there is one.
        metadata: stored with the elastic model (``ElasticModel.save``).
        details: the strategy's own richer result, if it has one (e.g. expansion growth's
            :class:`~nni_elastic.strategies.expansion_growth.GrowthResult`).
    """

    elastic_model: Optional[ElasticModel] = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    compute: dict[str, float] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    details: Any = None


@dataclass
class Step:
    """One unit of work that is checkpointed as a whole."""

    name: str
    kind: str
    arg: Any = None


@dataclass
class StepInfo:
    """Passed to ``on_step_end``: the finished step and the validation accuracy of the level it trained."""

    name: str
    index: int
    total: int
    val_accuracy: Optional[float] = None
    extra: dict = field(default_factory=dict)


class ParameterGuard:
    """Keeps the entries outside ``trainable`` masks exactly as they are (call after each optimizer step).

    Masking gradients is not enough: weight decay and momentum would still move "frozen" entries.
    The guard restores them from a snapshot instead, so frozen weights stay bit-identical.
    """

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor]) -> None:
        self.items = []
        self.params = []
        for name, p in model.named_parameters():
            mask = trainable.get(name)
            if mask is None or mask.all():
                if mask is not None:
                    self.params.append(p)
                continue
            if mask.any():
                self.params.append(p)
            self.items.append((p, mask, p.detach().clone()))

    @torch.no_grad()
    def __call__(self, *_: Any) -> None:
        for p, mask, saved in self.items:
            p.copy_(torch.where(mask, p, saved))


class Strategy(abc.ABC):
    """Base class of every strategy: typed options, the training settings, checkpoints, a report.

    Args:
        options: the strategy's ``Options`` dataclass (default: its defaults).
        train: the training settings (:class:`TrainConfig`, taken whole; its ``seed`` seeds the run).
        elastic: how models are wrapped into levels (:class:`ElasticOptions`), for strategies that wrap.
        device: ``auto``, ``cpu`` or ``cuda``.
        quiet: no progress bars.
        checkpoint_dir: where checkpoints go (needed for ``resume``).
        on_step_end: called with a :class:`StepInfo` after every step (e.g. to report to NNI).
        **settings: any field of ``Options``, ``TrainConfig`` or ``ElasticOptions`` by name
            (``PruneAndGrow(grow_epochs=3, lr=0.1, widths=(0.5, 1.0))``).

    Subclasses set ``Options`` and implement :meth:`fit`; ``name`` comes from :func:`register_strategy`.
    """

    name: ClassVar[str] = "strategy"
    Options: ClassVar[type] = type(None)

    def __init__(self, options: Any = None, *, train: Optional[TrainConfig] = None,
                 elastic: Optional[ElasticOptions] = None, device: str = "auto", quiet: bool = False,
                 checkpoint_dir: Optional[Union[str, Path]] = None,
                 on_step_end: Optional[Callable[[StepInfo], Any]] = None, **settings: Any) -> None:
        options = options if options is not None else self.Options()
        train = train if train is not None else TrainConfig()
        elastic = elastic if elastic is not None else ElasticOptions()
        parts = {"options": options, "train": train, "elastic": elastic}
        split: dict[str, dict[str, Any]] = {k: {} for k in parts}
        for key, value in settings.items():
            owner = next((k for k, obj in parts.items() if key in option_names(type(obj))), None)
            if owner is None:
                known = sorted({n for obj in parts.values() for n in option_names(type(obj))})
                close = difflib.get_close_matches(key, known, n=1)
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}"
                                f"{f'; did you mean {close[0]!r}?' if close else ''}")
            split[owner][key] = value
        self.options = dataclasses.replace(options, **split["options"])
        self.train = dataclasses.replace(train, **split["train"])
        self.elastic = dataclasses.replace(elastic, **split["elastic"])
        self.device = device
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.quiet = quiet
        self.on_step_end = on_step_end
        self.report_: list[dict[str, Any]] = []
        self.completed_: list[str] = []
        self.records_: dict[str, Any] = {}
        self.compute_: dict[str, float] = {}
        self.elastic_model_: Optional[ElasticModel] = None

    @property
    def seed(self) -> int:
        return self.train.seed

    @classmethod
    def num_levels(cls, options: Any, elastic: ElasticOptions) -> Optional[int]:
        """Levels a run with these settings yields, when known before it runs (None: found by the run)."""
        return None

    @abc.abstractmethod
    def fit(self, model: nn.Module, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader, *,
            resume: bool = False, example_inputs: Optional[torch.Tensor] = None) -> StrategyResult:
        """Run the strategy on ``model`` and return its :class:`StrategyResult`."""

    def run(self, model: nn.Module, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader, *,
            resume: bool = False, example_inputs: Optional[torch.Tensor] = None) -> StrategyResult:
        """:meth:`fit`, checked to return a :class:`StrategyResult` (what the runner and the adapters call)."""
        result = self.fit(model, train_data, val_data, resume=resume, example_inputs=example_inputs)
        if not isinstance(result, StrategyResult):
            raise TypeError(f"{type(self).__name__}.fit returned {type(result).__name__}; the strategy contract "
                            "is to return a StrategyResult")
        return result

    def report(self) -> list[dict[str, Any]]:
        """One row per level: level, width, MACs, params, accuracy, latency (after ``fit``)."""
        if not self.report_:
            raise RuntimeError(f"{type(self).__name__}.report() is available after fit()")
        return [dict(r) for r in self.report_]

    def _checkpoint_path(self, name: str = "elastic.pt") -> Optional[Path]:
        return self.checkpoint_dir / name if self.checkpoint_dir is not None else None

    def _notify(self, info: StepInfo) -> None:
        logger.info("step %d/%d %s done: %s", info.index + 1, info.total, info.name, info.val_accuracy)
        if self.on_step_end is not None:
            self.on_step_end(info)

    def config(self) -> dict[str, Any]:
        """The settings that determine a run, as plain data (stored in checkpoints, compared on resume)."""
        return {**dataclasses.asdict(self.options), **dataclasses.asdict(self.train)}

    def _check_config(self, stored: Optional[dict[str, Any]], path: Any) -> None:
        """Resume only with the settings the checkpoint was written with: anything else mixes two runs."""
        now = self.config()
        if stored is None or stored == now:
            return
        # a setting missing from the checkpoint did not exist when it was written: that run had its default
        defaults = {f.name: f.default for obj in (self.options, self.train) for f in dataclasses.fields(obj)
                    if f.default is not dataclasses.MISSING}
        keys = sorted(k for k in set(stored) | set(now) if stored.get(k, defaults.get(k)) != now.get(k))
        if not keys:
            return
        changes = ", ".join(f"{k}: {stored.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in keys)
        raise ValueError(f"resume: {path} was written with other settings ({changes}); resume with the same "
                         f"settings or start a new run in another checkpoint_dir")

    def _state(self) -> dict[str, Any]:
        return {"strategy": self.name, "completed": list(self.completed_), "records": self.records_}

    def _restore_state(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(f"checkpoint was written by strategy {state.get('strategy')!r}, not {self.name!r}")
        self.completed_ = list(state["completed"])
        self.records_ = dict(state["records"])


# ---------------------------------------------------------------------- registry
STRATEGIES: Registry[type] = Registry("strategy")
_entry_points_loaded = False


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Strategy` subclass runnable by name (recipe ``method: name``).

    Example:
        >>> @register_strategy("my_method")
        ... class MyMethod(Strategy):
        ...     Options = MyOptions
        ...     def fit(self, model, train_data, val_data, *, resume=False, example_inputs=None): ...
    """
    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"@register_strategy({name!r}) decorates a Strategy subclass, not {cls!r}")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"strategy {name!r}: {cls.__name__}.Options must be a dataclass of its settings")
        cls.name = name
        return STRATEGIES.register(name)(cls)

    return decorator


def _load_entry_points() -> None:
    """Import the modules installed packages name in the ``nni_elastic.strategies`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STRATEGIES:
            continue
        try:
            ep.load()
        except Exception as exc:  # one broken plugin must not break every other strategy
            logger.warning("strategy plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)


def load_plugins(modules: Sequence[str]) -> None:
    """Import modules that register strategies (or models, datasets); errors name the module.

    A recipe's ``plugins: [my_pkg.my_method]`` is imported through here before its ``method``
    resolves, so a strategy defined outside the package runs with ``nni-elastic run``.
    """
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ValueError(f"plugins[{i}]: cannot import {name!r} ({type(exc).__name__}: {exc}); put its "
                             f"folder on PYTHONPATH or install it") from None


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name`` (installed plugins included)."""
    if name not in STRATEGIES:
        _load_entry_points()
    return STRATEGIES.get(name)


def list_strategies() -> list[str]:
    """Names of the registered strategies (installed plugins included)."""
    _load_entry_points()
    return STRATEGIES.names()


# ---------------------------------------------------------------------- data helpers
def first_batches(data: Dataset | DataLoader, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of ``data`` in order (for importance and BN calibration)."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for i, (x, y) in enumerate(loader):
        if i >= count:
            break
        out.append((x, y))
    return out


def num_samples(data: Dataset | DataLoader) -> int:
    """Samples in a dataset or in a loader's dataset."""
    return len(data.dataset) if isinstance(data, DataLoader) else len(data)


def example_from(data: Dataset | DataLoader) -> torch.Tensor:
    """A batch of one input from a dataset or loader, for tracing."""
    if isinstance(data, DataLoader):
        x, _ = next(iter(data))
        return x[:1].clone()
    x, _ = data[0]
    return torch.as_tensor(x).unsqueeze(0).clone()
