"""Builtin models and model loading."""

from lorakit.models.builtin import BUILTIN_NAMES, ModelError, build_model, builtin_config

__all__ = ["BUILTIN_NAMES", "ModelError", "build_model", "builtin_config"]
