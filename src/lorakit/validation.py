"""The field checks every config uses, in one place: the adapter and quant configs (``lorakit.config``)
and the run config's typed sections (``lorakit.train.config``).

The rules: a choice names the closest allowed value, integers fit in 64 bits, numbers are finite,
booleans are booleans, strings hold no NUL and encode as UTF-8, regexes compile, a section is a mapping
whose unknown keys name the closest allowed key and whose values are checked against the section
dataclass's annotations, and a dtype is one of :data:`DTYPES`. Every error is a one-line ``ConfigError``
naming the field. At the bottom of the package: it imports only ``lorakit.errors``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorakit.errors import ConfigError, did_you_mean, show

# Every integer a config holds must fit in 64 bits: torch and numpy hold it, and a larger one is a typo.
INT_LIMIT = 2**63

# The floating dtypes a config may name (base weights, quantized compute), by their torch and short names.
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def parse_dtype(field_name: str, value: str | torch.dtype) -> torch.dtype:
    """A floating dtype from its name in :data:`DTYPES` (or the torch.dtype itself)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ConfigError(f"{field_name}={value} is not supported; expected bfloat16, float16 or float32")
        return value
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigError(f"{field_name}={show(value)} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[value]


def check_choice(field_name: str, value: Any, allowed: Sequence[str]) -> None:
    """``value`` is one of the strings ``allowed``; the error names the closest one."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(
            f"{field_name}={show(value)} is not supported; expected one of {list(allowed)}"
            + (did_you_mean(value, allowed) if isinstance(value, str) else "")
        )


def check_regex(field_name: str, pattern: Any) -> None:
    """``pattern`` is a non-empty string that compiles as a regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field_name}: {show(pattern)} is not a regex; expected a non-empty string")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(f"{field_name}: regex {show(pattern)} does not compile: {e}") from None


def check_int(
    field_name: str, value: Any, minimum: int = 1, optional: bool = False, example: str = ""
) -> None:
    """``value`` is an int (not a bool) in [minimum, 2**63), or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < INT_LIMIT:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(
            f"{field_name}={show(value)} is invalid; expected {what}"
            + (" or null" if optional else "")
            + (f" (e.g. {example})" if example else "")
        )


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float if it is an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def check_number(field_name: str, value: Any, ok: Any, expected: str) -> None:
    """``value`` is a finite int or float (not a bool) for which ``ok(value)`` holds."""
    f = finite_number(value)
    if f is None or not ok(f):
        raise ConfigError(f"{field_name}={show(value)} is invalid; expected {expected}")


def check_bool(field_name: str, value: Any) -> None:
    """``value`` is True or False (not 0/1, not "yes")."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}={show(value)} has the wrong type; expected true or false")


# ---- typed sections (the run config's model, data, training, output)
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
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[X, ...]
            return tuple(coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
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
                f"{section}: unknown key {show(key)}{did_you_mean(str(key), names)}; allowed: {names}"
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
