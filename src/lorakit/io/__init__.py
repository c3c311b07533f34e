"""Adapter files in PEFT's format (safetensors + adapter_config.json) and atomic writes."""

from lorakit.io.adapter_files import (
    AdapterConfigError,
    AdapterFileError,
    AdapterNotFoundError,
    adapter_state,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lorakit.io.peft_format import common_to_peft, config_from_peft, config_to_peft, register_peft_type

__all__ = [
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterNotFoundError",
    "adapter_state",
    "common_to_peft",
    "config_from_peft",
    "config_to_peft",
    "load_adapter",
    "read_adapter",
    "register_peft_type",
    "save_adapter",
]
