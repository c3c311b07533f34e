"""Typed sections of a run config: a YAML mapping checked against a frozen dataclass's annotations.

One place for the rules every section follows: unknown keys name the closest allowed key, wrong types
name the field and the expected type, numbers are finite and integers fit in 64 bits, strings hold no NUL
and encode as UTF-8, and a section is a mapping (or, when optional, left empty). Errors are one-line
``ConfigError``s naming ``section.key``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.config import INT_LIMIT, ConfigError, _closest, show


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{name}={show(value)} is not supported; expected one of {list(allowed)}"
            + (_closest(value, allowed) if isinstance(value, str) else "")
        )


def mapping(section: str, value: Any, optional: bool = False) -> dict[str, Any]:
    """A section's mapping; an optional section may be left empty (null) for its defaults."""
    if optional and value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"section {section!r} must be a mapping of key: value, got {type(value).__name__} {show(value, 40)}"
        )
    return dict(value)


def named(section: str, build: Any, data: dict[str, Any]) -> Any:
    """``build(data)`` with its ConfigError prefixed by the section, so the message names ``section.key``."""
    try:
        return build(data)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{section}:") else f"{section}: {msg}") from None


def yaml_floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings in ``cls``'s float fields read as numbers (YAML 1.1 reads 5e-2 as a string), as in
    the run config's own sections."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if isinstance(key, str) and hints.get(key) is float and isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp``; ints are accepted for floats, "2e-4" strings too
    (YAML 1.1 reads 2e-4 without a dot as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error (it may say more than "wrong type")
            return coerce(name, value, options[0])
        for a in options:
            try:
                return coerce(name, value, a)
            except ConfigError:
                continue
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -INT_LIMIT <= value < INT_LIMIT:
                return value
            raise ConfigError(
                f"{name}={show(value)} is out of range; expected an integer that fits in 64 bits"
            )
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                number = math.inf if isinstance(value, int) else None
        if number is not None:
            if math.isfinite(number):
                return number
            raise ConfigError(f"{name}={show(value)} is invalid; expected a finite number")
    elif tp is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{name}={show(value)} is invalid: it contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{name}={show(value)} is invalid: not encodable text") from None
            return value
    elif origin is dict:
        kt, vt = typing.get_args(tp)
        if isinstance(value, Mapping):
            return {coerce(name, k, kt): coerce(f"{name}[{show(k)}]", v, vt) for k, v in value.items()}
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(
        f"{name}={show(value)} has the wrong type: expected {type_name(tp)}, got {type(value).__name__}"
    )


def read_section(cls: type, section: str, value: Any) -> Any:
    data = mapping(section, value)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{section}: unknown key {show(key)}{_closest(str(key), names)}; allowed: {names}"
            )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in data:
            raise ConfigError(f"{section}.{key} is missing (required)")
    return cls(**{k: coerce(f"{section}.{k}", v, hints[k]) for k, v in data.items()})
