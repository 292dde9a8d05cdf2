"""Recipes: YAML files -> typed, validated dataclasses, in one place.

A recipe names the method, the model, the data, the elastic levels, the training settings and the
strategy's thresholds. Every error names the key (as a dotted path), the value and what is
allowed, e.g. ``strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']``.

Example:
    >>> recipe = load_recipe("strategies/prune_and_grow/digits.yaml", overrides={"strategy.grow_epochs": 1})
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    "RecipeError",
    "ModelSection",
    "DataSection",
    "ElasticSection",
    "TrainSection",
    "PruneAndGrowSection",
    "ExpansionGrowthSection",
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "parse_overrides",
    "recipe_differences",
]

# recipe keys that cannot change what a run computes: a resumed run may change them
RESUME_FREE_KEYS = ("output", "device", "source")

METHODS = ("prune_and_grow", "expansion_growth")


class RecipeError(ValueError):
    """A recipe is invalid; the message names the key, the value and the fix."""


@dataclass
class ModelSection:
    name: str = "resnet20"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataSection:
    name: str = "digits"
    root: Optional[str] = None
    val_fraction: float = 0.2
    seed: int = 0
    image_size: Optional[int] = None
    limit: Optional[int] = None


@dataclass
class ElasticSection:
    widths: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    importance: str = "l1"
    bn: str = "per_level"
    ignored_layers: list = field(default_factory=list)
    round_to: int = 1


@dataclass
class TrainSection:
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class PruneAndGrowSection:
    """Thresholds of prune-and-grow (see :class:`nni_elastic.strategies.PruneAndGrow`)."""

    pretrain_epochs: int = 4
    prune_steps: int = 3
    finetune_epochs: int = 1
    grow_epochs: int = 2
    grow_mode: str = "joint"
    regrow: str = "restore"
    finetune_lr: Optional[float] = None
    grow_lr: Optional[float] = None
    calibrate_batches: int = 20


@dataclass
class ExpansionGrowthSection:
    """Thresholds of expansion-score growth (see :class:`nni_elastic.strategies.ExpansionGrowth`)."""

    epochs: int = 10
    threshold: float = 0.03
    check_every: int = 100
    warmup_steps: Optional[int] = None
    max_params: Optional[int] = None
    max_macs: Optional[int] = None
    damping: float = 1.0
    size_penalty: float = 0.0
    score_batch: int = 64
    candidates: list = field(default_factory=lambda: ["depth", "width"])
    width_fraction: float = 0.25


@dataclass
class Recipe:
    method: str = "prune_and_grow"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    elastic: ElasticSection = field(default_factory=ElasticSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: dict = field(default_factory=dict)
    output: str = "runs/recipe"
    device: str = "auto"
    seed: int = 0
    source: Optional[str] = None

    def strategy_section(self) -> Union[PruneAndGrowSection, ExpansionGrowthSection]:
        return _build(STRATEGY_SECTIONS[self.method], self.strategy, "strategy")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


STRATEGY_SECTIONS = {"prune_and_grow": PruneAndGrowSection, "expansion_growth": ExpansionGrowthSection}

_CHOICES = {
    "method": METHODS,
    "device": None,  # checked by resolve_device at run time
    "elastic.bn": ("per_level", "shared"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "strategy.grow_mode": ("freeze", "joint"),
    "strategy.regrow": ("restore", "reinit"),
}
_POSITIVE = {
    "data.val_fraction", "train.lr", "train.batch_size", "strategy.prune_steps", "data.image_size", "data.limit",
    "strategy.finetune_lr", "strategy.grow_lr", "elastic.round_to", "strategy.check_every", "strategy.score_batch",
    "strategy.max_params", "strategy.max_macs", "strategy.damping", "strategy.width_fraction",
}
_NON_NEGATIVE = {
    "strategy.pretrain_epochs", "strategy.finetune_epochs", "strategy.grow_epochs", "strategy.calibrate_batches",
    "train.weight_decay", "strategy.epochs", "strategy.threshold", "strategy.size_penalty", "strategy.warmup_steps",
    "train.momentum", "seed", "data.seed",
}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (list, dict, str):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"unknown recipe key {path!r}{hint} allowed keys here: {sorted(fields)}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = _build(hint_t, value, path)
            continue
        if not _type_ok(value, hint_t):
            raise RecipeError(f"{path}: {value!r} has type {type(value).__name__}, expected {_type_name(hint_t)}")
        _check_range(path, value)
        kwargs[key] = value
    return cls(**kwargs)


def _check_range(path: str, value: Any) -> None:
    choices = _CHOICES.get(path)
    if choices and value not in choices:
        raise RecipeError(f"{path}: {value!r} is not one of {list(choices)}")
    if value is None or isinstance(value, (str, list, dict)):
        return
    if path in _POSITIVE and not value > 0:
        raise RecipeError(f"{path}: {value!r} must be > 0")
    if path in _NON_NEGATIVE and value < 0:
        raise RecipeError(f"{path}: {value!r} must be >= 0")
    if path == "data.val_fraction" and not 0 < value < 1:
        raise RecipeError(f"{path}: {value!r} must be in (0, 1)")


def _check_widths(widths: Any) -> None:
    if not isinstance(widths, list) or not widths:
        raise RecipeError(f"elastic.widths: {widths!r} must be a non-empty list of fractions in (0, 1], e.g. [0.25, 0.5, 1.0]")
    for i, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise RecipeError(f"elastic.widths[{i}]: {w!r} must be a fraction in (0, 1]")
    for a, b in zip(widths, widths[1:]):
        if not b > a:
            raise RecipeError(f"elastic.widths: {widths} must be strictly increasing (smallest level first)")


def recipe_from_dict(data: Mapping[str, Any], *, source: Optional[str] = None, check_paths: bool = True) -> Recipe:
    """Validate a recipe mapping; raises :class:`RecipeError` naming the offending key."""
    recipe = _build(Recipe, data, "")
    recipe.source = source
    _check_widths(recipe.elastic.widths)
    recipe.strategy_section()  # validates the method's strategy keys
    if check_paths and recipe.data.root is not None:
        root = Path(os.path.expanduser(recipe.data.root))
        if not root.is_absolute() and source is not None and not root.exists():
            candidate = Path(source).parent / root
            root = candidate if candidate.exists() else root
        if not root.exists():
            raise RecipeError(
                f"data.root: directory {str(root)!r} does not exist; set data.root to the {recipe.data.name} "
                f"directory (or override it: --set data.root=/path/to/data)"
            )
        recipe.data.root = str(root)
    return recipe


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["strategy.grow_epochs=1", ...]`` (``--set`` arguments) -> ``{"strategy.grow_epochs": "1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: use dotted.key=value, e.g. --set strategy.grow_epochs=1")
        out[key.strip()] = value
    return out


def apply_overrides(data: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys (``{"strategy.grow_epochs": 1}``) in a nested recipe mapping (a copy)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            try:
                value = _parse_scalar(value)
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise RecipeError(f"--set {dotted}={value}: the value is not valid YAML ({problem}); close brackets "
                                  f"and quote text, e.g. --set elastic.widths=[0.25,0.5,1.0]") from None
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_recipe(path: Union[str, os.PathLike], overrides: Optional[Mapping[str, Any]] = None, *, check_paths: bool = True) -> Recipe:
    """Read and validate a YAML recipe, applying dotted ``overrides`` first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist; recipes ship in strategies/<method>/*.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return recipe_from_dict(data, source=str(path), check_paths=check_paths)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def recipe_differences(stored: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Sequence[str] = RESUME_FREE_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, new value)}`` for every key where two recipe mappings differ.

    Keys in ``ignore`` (and below them) may differ. Both sides go through YAML first, so a tuple and
    a list, or a recipe and its ``recipe.yaml``, compare equal.
    """
    def norm(d: Mapping[str, Any]) -> dict[str, Any]:
        return _flatten(yaml.safe_load(yaml.safe_dump(dict(d), sort_keys=True)) or {})

    a, b = norm(stored), norm(new)
    skip = tuple(ignore)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == i or k.startswith(i + ".") for i in skip)}
