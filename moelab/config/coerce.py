"""Plain data -> config dataclasses: every value checked against its field's type hint, unknown keys refused."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from moelab.errors import ConfigError


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type hint (int, float, bool, str, ``X | None``,
    ``tuple[X, ...]``, ``Literal``); a mismatch is a ConfigError naming the field, so a wrong type in
    a config file never reaches torch. ints are accepted for floats; bools are not ints here."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(name, value, f"must be {describe(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(name, value, f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, f"must be a list ({describe(hint)})")
        item = args[0] if args else Any
        return tuple(coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, value, "must be an integer")
        return value
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ConfigError(name, value, f"must be {_TYPE_WORDS[hint]}")
        return value
    return value


def describe(hint: Any) -> str:
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(describe(a) for a in args) or str(hint)


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, recursing into nested configs; unknown keys raise."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(where, type(data).__name__, "expected a mapping of field names to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}", data[unknown[0]],
            f"unknown field of {cls.__name__}; known fields: {', '.join(sorted(names))}",
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix + '.' if prefix else ''}{key}"
        sub = dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, name)
        elif sub is not None and not dataclasses.is_dataclass(value):
            optional = type(None) in typing.get_args(hints[key])
            if not (value is None and optional):
                raise ConfigError(name, value, f"must be a mapping of {sub.__name__} fields" + (" or null" if optional
                                                                                               else ""))
        elif sub is None:
            value = coerce(name, value, hints[key])
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - names already checked above
        raise ConfigError(where, data, str(e)) from e
