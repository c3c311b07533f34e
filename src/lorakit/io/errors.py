"""The errors of reading and loading adapter files: each is one line naming the file and the field,
tensor key or layer."""

from __future__ import annotations

from lorakit.config import ConfigError


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, unreadable, or does not fit the model."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """The adapter directory or one of its files does not exist (never looked up on a hub)."""


class AdapterConfigError(AdapterFileError, ConfigError):
    """``adapter_config.json`` holds a value lorakit cannot honour, or one that does not fit its tensors
    or the model (the message starts with the file and names the field)."""
