"""Recipes: YAML files -> typed, validated dataclasses, in one place.

A recipe names the method, the model, the data, the elastic levels, the training settings and the
strategy's thresholds. Every error names the key (as a dotted path), the value and what is
allowed, e.g. ``strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']``.

Example:
    >>> recipe = load_recipe("strategies/prune_and_grow/digits.yaml", overrides={"strategy.grow_epochs": 1})
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .options import from_mapping, option
from .strategies import ElasticOptions, get_strategy, list_strategies, load_plugins
from .training import TrainConfig

__all__ = [
    "RecipeError",
    "ModelSection",
    "DataSection",
    "ElasticOptions",
    "TrainConfig",
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "parse_overrides",
    "recipe_differences",
]

# recipe keys that cannot change what a run computes: a resumed run may change them
RESUME_FREE_KEYS = ("output", "device", "source")
# TrainConfig fields a recipe does not set: each strategy has its own epochs, the recipe one seed
TRAIN_KEYS_OMITTED = ("epochs", "seed")


class RecipeError(ValueError):
    """A recipe is invalid; the message names the key, the value and the fix."""


@dataclass
class ModelSection:
    name: str = option("resnet20")
    kwargs: dict = option(default_factory=dict)


@dataclass
class DataSection:
    name: str = option("digits")
    root: Optional[str] = option(None)
    val_fraction: float = option(0.2, gt=0, lt=1)
    seed: int = option(0, ge=0)
    image_size: Optional[int] = option(None, gt=0)
    limit: Optional[int] = option(None, gt=0)


@dataclass
class Recipe:
    """A validated recipe. ``strategy`` is the ``Options`` dataclass of the ``method``'s strategy.

    ``plugins`` are modules imported before ``method`` resolves (strategies registered outside
    the package); ``train`` is the :class:`TrainConfig` every strategy takes whole (its epochs
    are the strategy's, its seed is ``seed``).
    """

    method: str = option("prune_and_grow", choices=list_strategies)
    plugins: list = option(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    elastic: ElasticOptions = field(default_factory=ElasticOptions)
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"omit": TRAIN_KEYS_OMITTED})
    strategy: Any = option(None)
    output: str = option("runs/recipe")
    device: str = option("auto")  # checked by resolve_device when the run starts
    seed: int = option(0, ge=0)
    source: Optional[str] = option(None, key=False)

    def __post_init__(self) -> None:
        load_plugins(self.plugins)
        options_type = get_strategy(self.method).Options
        if not isinstance(self.strategy, options_type):
            self.strategy = from_mapping(options_type, self.strategy, "strategy", error=RecipeError)

    def strategy_section(self) -> Any:
        """The strategy's typed options (the same object as ``recipe.strategy``)."""
        return self.strategy

    def train_config(self) -> TrainConfig:
        """The training settings of the run: the ``train:`` section with the recipe's seed."""
        return dataclasses.replace(self.train, seed=self.seed)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        for key in TRAIN_KEYS_OMITTED:
            out["train"].pop(key, None)
        return out


def _plugins_of(data: Mapping[str, Any]) -> list[str]:
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise RecipeError(f"plugins: {plugins!r} must be a list of module names, e.g. [my_package.my_strategy]")
    return plugins


def recipe_from_dict(data: Mapping[str, Any], *, source: Optional[str] = None, check_paths: bool = True) -> Recipe:
    """Validate a recipe mapping; raises :class:`RecipeError` naming the offending key."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        load_plugins(_plugins_of(data))  # before ``method`` resolves: plugins register strategies
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    recipe = from_mapping(Recipe, data, "", error=RecipeError)
    recipe.source = source
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
