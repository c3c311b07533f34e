"""lorakit: parameter-efficient fine-tuning (LoRA, QLoRA, DoRA, AdaLoRA) for PyTorch and Hugging Face models.

This module only re-exports the public API.
"""

from lorakit.adapters.base import register_method
from lorakit.bench.params import EfficiencyReport, count_parameters, efficiency_report
from lorakit.config import AdapterConfig, ConfigError, QuantConfig
from lorakit.models import build_model
from lorakit.surgery.inject import (
    active_adapter,
    adapter_configs,
    delete_adapter,
    disabled,
    inject,
    set_adapter,
)
from lorakit.surgery.layer import AdaptedLayer, AdapterStateError
from lorakit.surgery.targets import TargetError, find_targets

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterStateError",
    "ConfigError",
    "EfficiencyReport",
    "QuantConfig",
    "TargetError",
    "active_adapter",
    "adapter_configs",
    "build_model",
    "count_parameters",
    "delete_adapter",
    "disabled",
    "efficiency_report",
    "find_targets",
    "inject",
    "register_method",
    "set_adapter",
]
