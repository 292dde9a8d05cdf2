"""NNI-format search spaces (``search_spaces/*.json``) as Optuna distributions, and back.

The JSON files are the one source of truth for both adapters: NNI's tuners read them as they
are, the Optuna studies translate them here. A key is a dotted recipe key
(``"strategy.grow_epochs"``), so a trial's parameters are recipe overrides, in NNI and Optuna alike.

Translation (NNI ``_type`` -> Optuna distribution):

=============================  ==============================================================
``choice``     [v0, v1, ...]   ``CategoricalDistribution((v0, v1, ...))``; values must be
                               numbers or strings (as NNI requires); a list-valued recipe key
                               is written as a YAML string, e.g. ``"[0.25, 0.5, 1.0]"``
``randint``    [lower, upper)  ``IntDistribution(lower, upper - 1)`` (NNI's upper bound is
                               exclusive, Optuna's inclusive)
``uniform``    [low, high]     ``FloatDistribution(low, high)``
``quniform``   [low, high, q]  ``FloatDistribution(low, high, step=q)``; ``low`` and ``high``
                               must be multiples of ``q`` so that Optuna's grid
                               ``low + k q`` is NNI's grid ``round(x / q) q``
``loguniform`` [low, high]     ``FloatDistribution(low, high, log=True)``
=============================  ==============================================================

Nested choices (``{"_name": ...}`` dicts), ``qloguniform`` (Optuna has no log grid) and the
unbounded ``normal``/``lognormal`` families have no Optuna distribution: they are rejected with
an error naming the key.

Default search space of a recipe: ``search_spaces/<method>_<recipe stem>.json``, e.g.
``strategies/prune_and_grow/digits.yaml`` -> ``search_spaces/prune_and_grow_digits.json``.
Looked up in this order: the ``search_spaces/`` folder of the recipe's folder or any folder
above it (the repository the recipe lives in), of the working directory, then of the
repository nni-elastic is installed from (editable installs).

Example:
    >>> space = load_search_space("search_spaces/prune_and_grow_digits.json")
    >>> dists = to_distributions(space)        # {"strategy.grow_epochs": IntDistribution(1, 3), ...}
    >>> params = suggest(trial, space)          # inside an Optuna objective: NNI-valid values
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "SUPPORTED_TYPES",
    "SearchSpaceError",
    "load_search_space",
    "to_distributions",
    "suggest",
    "check_params",
    "default_search_space",
    "find_search_space",
    "pin",
]

SUPPORTED_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform")
NNI_TYPES = SUPPORTED_TYPES + ("qloguniform", "normal", "qnormal", "lognormal", "qlognormal")
_WHY_NOT = {
    "qloguniform": "Optuna cannot combine log=True with a step",
    "normal": "it is unbounded; Optuna distributions need bounds",
    "qnormal": "it is unbounded; Optuna distributions need bounds",
    "lognormal": "it is unbounded; Optuna distributions need bounds",
    "qlognormal": "it is unbounded; Optuna distributions need bounds",
}
SpaceLike = Union[str, os.PathLike, Mapping[str, Any]]
# the repository nni-elastic is installed from (editable installs): nni_elastic/optuna/_space.py -> ../../..
_PACKAGE_REPO = Path(__file__).resolve().parents[2]


class SearchSpaceError(ValueError):
    """A search space is invalid or cannot be translated; the message names the file and the key."""


def _where(source: Any) -> str:
    return f"search space {str(source)!r}" if isinstance(source, (str, os.PathLike)) else "search space"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _multiple_of(value: float, q: float) -> bool:
    k = value / q
    return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))


def _check_spec(key: str, spec: Any, where: str) -> None:
    def fail(msg: str) -> None:
        raise SearchSpaceError(f"{where}: {key!r}: {msg}")

    if not isinstance(spec, Mapping) or "_type" not in spec or "_value" not in spec:
        fail(f'expected {{"_type": ..., "_value": [...]}}, got {spec!r}')
    kind, args = spec["_type"], spec["_value"]
    if kind not in NNI_TYPES:
        fail(f"unknown type {kind!r}; NNI types are {list(NNI_TYPES)}")
    if kind not in SUPPORTED_TYPES:
        fail(f"type {kind!r} has no Optuna distribution ({_WHY_NOT[kind]}); supported: {list(SUPPORTED_TYPES)}")
    if not isinstance(args, list) or not args:
        fail(f"_value must be a non-empty list, got {args!r}")
    if kind == "choice":
        for v in args:
            if isinstance(v, Mapping):
                fail("nested choice (a choice of {\"_name\": ...} dicts) is not supported by the Optuna adapter; "
                     "flatten it into separate keys")
            if not isinstance(v, (str, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                fail(f"choice value {v!r} must be a number or a string (write a list as a YAML string, e.g. "
                     f"\"[0.25, 0.5, 1.0]\")")
        if len(set(map(repr, args))) != len(args):
            fail(f"choice values must be distinct, got {args}")
        return
    size = 3 if kind == "quniform" else 2
    if len(args) != size or not all(_is_number(v) for v in args):
        fail(f"{kind} takes {size} numbers, got {args!r}")
    low, high = args[0], args[1]
    if kind == "randint":
        if not all(isinstance(v, int) for v in args):
            fail(f"randint bounds must be integers, got {args!r}")
        if high - low < 1:
            fail(f"randint [lower, upper) needs upper > lower (upper is exclusive), got {args!r}")
        return
    if not high > low:
        fail(f"{kind} needs high > low, got {args!r}")
    if kind == "loguniform" and not low > 0:
        fail(f"loguniform needs low > 0, got {args!r}")
    if kind == "quniform":
        q = args[2]
        if not q > 0:
            fail(f"quniform needs q > 0, got {args!r}")
        if not (_multiple_of(low, q) and _multiple_of(high, q)):
            fail(f"quniform bounds {low} and {high} must be multiples of q={q} (so that NNI's and Optuna's "
                 f"grids agree)")


def load_search_space(source: SpaceLike) -> dict[str, dict[str, Any]]:
    """Read and validate an NNI search space (a JSON file path or a mapping).

    Every key must have a type this adapter translates (see the module docstring); errors name
    the file and the key. An empty space is an error.

    Example:
        >>> load_search_space({"strategy.grow_mode": {"_type": "choice", "_value": ["joint", "freeze"]}})
    """
    where = _where(source)
    if isinstance(source, Mapping):
        space = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"search space {str(path)!r} does not exist")
        try:
            space = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SearchSpaceError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(space, dict):
        raise SearchSpaceError(f"{where}: expected a JSON object of {{key: {{\"_type\", \"_value\"}}}}, got {type(space).__name__}")
    if not space:
        raise SearchSpaceError(f"{where} is empty: nothing to search; add at least one key, e.g. "
                               f'{{"strategy.grow_epochs": {{"_type": "randint", "_value": [1, 4]}}}}')
    for key, spec in space.items():
        _check_spec(key, spec, where)
    return {k: {"_type": v["_type"], "_value": list(v["_value"])} for k, v in space.items()}


def to_distributions(space: SpaceLike) -> dict[str, "optuna.distributions.BaseDistribution"]:
    """One Optuna distribution per key, with the NNI bounds (see the table in the module docstring)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, spec in load_search_space(space).items():
        kind, args = spec["_type"], spec["_value"]
        if kind == "choice":
            out[key] = CategoricalDistribution(tuple(args))
        elif kind == "randint":
            out[key] = IntDistribution(args[0], args[1] - 1)
        elif kind == "uniform":
            out[key] = FloatDistribution(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=True)
        else:  # quniform
            out[key] = FloatDistribution(float(args[0]), float(args[1]), step=float(args[2]))
    return out


def suggest(trial: "optuna.trial.Trial", space: SpaceLike) -> dict[str, Any]:
    """Sample every key of ``space`` with the trial's public ``suggest_*`` API; returns NNI-valid values."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    params = {}
    for key, dist in to_distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, FloatDistribution):
            params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_int(key, dist.low, dist.high)
    return params


def check_params(space: SpaceLike, params: Mapping[str, Any]) -> None:
    """Raise :class:`SearchSpaceError` unless ``params`` holds a valid NNI value for every key of ``space``.

    Valid means what NNI's tuners can produce: one of the ``choice`` values, an integer in
    ``[lower, upper)`` for ``randint``, a float in ``[low, high]`` (on the ``q`` grid for
    ``quniform``).
    """
    space = load_search_space(space)
    missing = sorted(set(space) - set(params))
    extra = sorted(set(params) - set(space))
    if missing or extra:
        raise SearchSpaceError(f"parameters do not match the search space: missing {missing}, unknown {extra}")
    for key, spec in space.items():
        kind, args, v = spec["_type"], spec["_value"], params[key]
        if kind == "choice":
            ok = any(v == c and (type(v) is type(c) or (_is_number(v) and _is_number(c))) for c in args)
        elif kind == "randint":
            ok = isinstance(v, int) and not isinstance(v, bool) and args[0] <= v < args[1]
        else:
            ok = _is_number(v) and args[0] - 1e-12 <= v <= args[1] + 1e-12
            if ok and kind == "quniform":
                ok = _multiple_of(v, args[2])
        if not ok:
            raise SearchSpaceError(f"{key!r}: {v!r} is not a valid value of {kind} {args}")


def pin(space: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The space without the keys that ``overrides`` fixes (an override pins a key)."""
    return {k: v for k, v in space.items() if k not in overrides}


def default_search_space(method: str, recipe_stem: str) -> str:
    """File name of a recipe's default search space: ``<method>_<recipe stem>.json``."""
    return f"{method}_{recipe_stem}.json"


def find_search_space(name: str, near: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Locate ``search_spaces/<name>``: beside ``near`` or any folder above it, the working directory,
    then the repository nni-elastic is installed from. Raises ``FileNotFoundError`` listing the places tried."""
    bases: list[Path] = []
    if near is not None:
        start = Path(near).resolve()
        bases.extend([start] if start.is_dir() else [])
        bases.extend(start.parents)
    bases.extend([Path.cwd(), _PACKAGE_REPO])
    tried = []
    for base in bases:
        candidate = base / "search_spaces" / name
        if candidate in tried:
            continue
        if candidate.is_file():
            return candidate
        tried.append(candidate)
    raise FileNotFoundError(
        f"no search space {name!r}; looked for " + ", ".join(str(p) for p in tried[:4])
        + (" ..." if len(tried) > 4 else "") + "; pass search_space=<file.json> (--search-space)"
    )
