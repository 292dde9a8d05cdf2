"""Typed options: dataclass fields that declare their own range and choices, checked in one place.

Every settings object (a recipe section, :class:`~nni_elastic.training.TrainConfig`, a strategy's
options) is a dataclass whose fields are declared with :func:`option`. :func:`from_mapping`
builds one from plain data (a recipe section) and names the offending key as a dotted path;
:func:`check_options` checks a constructed one (call it from ``__post_init__``) and names the
keyword. Both say what is allowed, e.g.::

    strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']      (recipe)
    grow_mode='frozen' is not one of ['freeze', 'joint']                (Python keyword)

Example:
    >>> @dataclass
    ... class Options:
    ...     epochs: int = option(2, ge=0)
    ...     mode: str = option("joint", choices=("freeze", "joint"))
    ...     def __post_init__(self): check_options(self)
    >>> from_mapping(Options, {"epochs": 3}, "strategy")
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["option", "Rule", "from_mapping", "check_options", "option_names"]

Choices = Union[Sequence[Any], Callable[[], Iterable[Any]]]


@dataclass(frozen=True)
class Rule:
    """What a field admits besides its type: bounds, choices (a sequence or a function giving one), a check."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    choices: Optional[Choices] = None
    check: Optional[Callable[[Any, str], None]] = None  # raises ValueError(message) given (value, label)

    def allowed(self) -> Optional[list]:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def bounds(self) -> str:
        lo = f"({self.gt}" if self.gt is not None else f"[{self.ge}" if self.ge is not None else None
        hi = f"{self.lt})" if self.lt is not None else f"{self.le}]" if self.le is not None else None
        if lo and hi:
            return f"must be in {lo}, {hi}"
        if lo:
            return f"must be {'>' if self.gt is not None else '>='} {self.gt if self.gt is not None else self.ge}"
        return f"must be {'<' if self.lt is not None else '<='} {self.lt if self.lt is not None else self.le}"


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, gt: Optional[float] = None,
           ge: Optional[float] = None, lt: Optional[float] = None, le: Optional[float] = None,
           choices: Optional[Choices] = None, check: Optional[Callable[[Any, str], None]] = None,
           key: bool = True) -> Any:
    """A dataclass field with its rule; ``key=False``: not settable from plain data (e.g. a recipe's source)."""
    rule = Rule(gt, ge, lt, le, choices, check)
    return field(default=default, default_factory=default_factory, metadata={"rule": rule, "key": key})


def option_names(cls: type) -> list[str]:
    """The keys plain data may set for an options dataclass."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.get_origin(Sequence)):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if hint is list:
        return isinstance(value, (list, tuple))
    if origin is typing.get_origin(Callable):
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _label(path: str, value: Any, recipe: bool) -> str:
    return f"{path}: {value!r}" if recipe else f"{path}={value!r}"


def _check_value(value: Any, hint: Any, rule: Optional[Rule], path: str, recipe: bool, error: type) -> None:
    label = _label(path, value, recipe)
    if not _type_ok(value, hint):
        raise error(f"{label} has type {type(value).__name__}, expected {_type_name(hint)}")
    if rule is None or value is None:
        return
    allowed = rule.allowed()
    if allowed is not None:
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, str) and item not in allowed:
                raise error(f"{label if item is value else _label(path, item, recipe)} is not one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if ((rule.gt is not None and not value > rule.gt) or (rule.ge is not None and not value >= rule.ge)
                or (rule.lt is not None and not value < rule.lt) or (rule.le is not None and not value <= rule.le)):
            raise error(f"{label} {rule.bounds()}")
    if rule.check is not None:
        try:
            rule.check(value, label)
        except ValueError as exc:
            raise error(str(exc)) from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_options(obj: Any, where: Optional[str] = None, *, error: type = ValueError) -> None:
    """Check every field of a constructed options dataclass (types, bounds, choices, checks)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or not f.metadata.get("key", True):
            continue
        path = f"{where}.{f.name}" if where else f.name
        _check_value(value, hints[f.name], f.metadata.get("rule"), path, bool(where), error)


def from_mapping(cls: type, data: Any, where: str = "", *, error: type = ValueError, omit: Sequence[str] = (),
                 noun: str = "recipe key") -> Any:
    """Build the options dataclass ``cls`` from plain data, naming any bad key by its dotted path.

    Args:
        cls: a dataclass declared with :func:`option` fields (nested dataclasses are built too).
        data: a mapping (None: all defaults).
        where: the dotted path of ``data`` (``"strategy"``), for messages.
        error: the exception type raised.
        omit: field names plain data may not set here.
        noun: what a key is called in messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise error(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = [k for k in option_names(cls) if k not in omit]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in keys:
            close = difflib.get_close_matches(str(key), sorted(keys), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise error(f"unknown {noun} {path!r}{hint} allowed keys here: {sorted(keys)}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = from_mapping(hint_t, value, path, error=error, omit=fields[key].metadata.get("omit", ()))
            continue
        _check_value(value, hint_t, fields[key].metadata.get("rule"), path, True, error)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a check across fields in __post_init__
        raise error(f"{where}: {exc}" if where else str(exc)) from None
