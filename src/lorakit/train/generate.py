"""Moved to ``lorakit.models.generate`` (text generation from a model: the CLI and recipes use it, not the
trainer); this old import path re-exports its public names for one release."""

from lorakit.models.generate import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    TEMPLATES,
    generate,
    generate_ids,
    prompt_ids,
)

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "TEMPLATES", "generate", "generate_ids", "prompt_ids"]
