"""lorakit inside other people's training loops: :mod:`lorakit.integrations.hf_trainer` (HF Trainer, TRL)
and :func:`byte_tokenizer` (the builtin models' vocabulary as a transformers tokenizer).

Nothing here is imported by ``import lorakit``; each module imports its library (an optional extra) itself.
"""

from lorakit.integrations.byte_tokenizer import byte_tokenizer
from lorakit.integrations.hf_trainer import LorakitCallback

__all__ = ["LorakitCallback", "byte_tokenizer"]
