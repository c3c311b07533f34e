"""lorakit: parameter-efficient fine-tuning (LoRA, QLoRA, DoRA, AdaLoRA) for PyTorch and Hugging Face models.

This module only re-exports the public API.
"""

from lorakit.config import AdapterConfig, ConfigError, QuantConfig
from lorakit.models import build_model

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "QuantConfig",
    "build_model",
]
