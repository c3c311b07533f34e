"""The errors every layer raises for bad input, and the helpers that keep their messages on one line.

At the bottom of the package (see the layers contract in pyproject.toml): the adapters, the config (``lorakit.config``), the method registry (``lorakit.methods``)
and everything above them raise these. ``lorakit.config`` re-exports them under their usual names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what was expected."""


class AdapterStateError(RuntimeError):
    """An operation does not fit the adapter state (e.g. merging twice, unknown adapter name).

    Raised by the adapters (DoRA's unmerge) and by surgery and io above them, so it lives down here."""


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` naming the choice closest to ``name``, or "" when none is close."""
    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
