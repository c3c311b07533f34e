"""lorakit: parameter-efficient fine-tuning (LoRA, QLoRA, DoRA, AdaLoRA) for PyTorch and Hugging Face models.

This module only re-exports the public API. The trainer, planner and serving helpers are imported on
first use (``lorakit.train``, ``lorakit.plan``, ``lorakit.generate_rows``, ...), so ``import lorakit`` stays light.
"""

from importlib import import_module
from typing import Any

from lorakit.adapters.base import register_method
from lorakit.bench.params import EfficiencyReport, count_parameters, efficiency_report
from lorakit.config import AdapterConfig, ConfigError, QuantConfig
from lorakit.io import load_adapter, save_adapter
from lorakit.models import build_model
from lorakit.quant import load_quantized, quantize
from lorakit.surgery.inject import (
    active_adapter,
    adapter_configs,
    delete_adapter,
    disabled,
    inject,
    set_adapter,
)
from lorakit.surgery.layer import AdaptedLayer, AdapterStateError
from lorakit.surgery.merge import combine_adapters, merge, unload, unmerge
from lorakit.surgery.targets import TargetError, find_targets
from lorakit.version import __version__ as __version__

# name -> "module:attribute", imported on first access
_LAZY = {
    "train": "lorakit.train.trainer:train",
    "TrainResult": "lorakit.train.trainer:TrainResult",
    "RunConfig": "lorakit.train.config:RunConfig",
    "load_run_config": "lorakit.train.config:load_run_config",
    "Callback": "lorakit.train.callbacks:Callback",
    "check_dataset": "lorakit.train.check:check_dataset",
    "plan": "lorakit.planner.plan:plan",
    "adalora_step": "lorakit.adapters.adalora:adalora_step",
    "adalora_orth_loss": "lorakit.adapters.adalora:adalora_orth_loss",
    "rank_report": "lorakit.bench.adalora_report:rank_report",
    "adapter_rows": "lorakit.serving.mixed:adapter_rows",
    "mixed_forward": "lorakit.serving.mixed:mixed_forward",
    "enable_adapter_names": "lorakit.serving.mixed:enable_adapter_names",
    "generate_rows": "lorakit.serving.mixed:generate_rows",
    "generate": "lorakit.serving.mixed:generate",  # old name of generate_rows, kept for one release
    "run_quickstart": "lorakit.recipes.quickstart:run_quickstart",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


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
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disabled",
    "efficiency_report",
    "find_targets",
    "inject",
    "load_adapter",
    "load_quantized",
    "merge",
    "quantize",
    "register_method",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
    *_LAZY,
]
