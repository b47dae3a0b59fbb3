"""Config fields that declare their valid values, so a dataclass is the one place a setting is defined.

`bounded()` puts the range (or choices) of a field in its metadata; `check_fields()` enforces it in the
dataclass's __post_init__, and readers of user settings (pipeline.core.params) derive their checks from the
same metadata, so a hyperparameter's name, type, default and range are written once.
"""
from __future__ import annotations

import math
import typing
from dataclasses import Field, field, fields
from functools import cache
from typing import Any


def bounded(default: Any, *, low: float | None = None, high: float | None = None, bounds: str = "[]",
            choices: tuple = ()) -> Any:
    """A dataclass field whose value must lie in [low, high] (`bounds` "(]" etc. opens an end) or in `choices`."""
    return field(default=default, metadata={"low": low, "high": high, "bounds": bounds, "choices": tuple(choices)})


def describe_range(low: float | None, high: float | None, bounds: str) -> str:
    """The range as text: ">= 1", "< 10", "in (0, 1]"."""
    if high is None:
        return f"{'>' if bounds[0] == '(' else '>='} {low:g}"
    if low is None:
        return f"{'<' if bounds[1] == ')' else '<='} {high:g}"
    return f"in {bounds[0]}{low:g}, {high:g}{bounds[1]}"


def in_range(value: float, low: float | None, high: float | None, bounds: str) -> bool:
    low_ok = low is None or (value > low if bounds[0] == "(" else value >= low)
    high_ok = high is None or (value < high if bounds[1] == ")" else value <= high)
    return low_ok and high_ok


def type_ok(value: Any, kind: type) -> bool:
    """Whether `value` is a `kind`: a bool is never a number, a float must be finite, an int may stand for a float."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


@cache
def _hints(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def value_type(config_class: type, name: str) -> tuple[type, bool]:
    """(type, may be None) of a field, from its annotation: `int | None` gives (int, True)."""
    hint = _hints(config_class)[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(hint):
        return args[0], True
    return typing.get_origin(hint) or hint, False


def _problem(spec: Field, value: Any) -> str | None:
    """What is wrong with `value` for a bounded field ("must be in [0, 1)"), or None."""
    meta = spec.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return "must be one of " + ", ".join(map(str, meta["choices"]))
    low, high = meta.get("low"), meta.get("high")
    if (low is not None or high is not None) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not in_range(value, low, high, meta["bounds"]):
            return f"must be {describe_range(low, high, meta['bounds'])}"
    return None


def check_fields(config: Any) -> None:
    """Raise ValueError naming the first field of `config` whose value breaks its type or range."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        kind, nullable = value_type(type(config), spec.name)
        if value is None and nullable:
            continue
        if kind in (int, float, bool, str) and not type_ok(value, kind):
            raise ValueError(f"{type(config).__name__}.{spec.name} must be of type {kind.__name__}, got {value!r}")
        why = _problem(spec, value)
        if why:
            raise ValueError(f"{type(config).__name__}.{spec.name} {why}, got {value!r}")
