"""lorakit inside other people's training loops: :mod:`lorakit.integrations.hf_trainer` (HF Trainer, TRL).

Nothing here is imported by ``import lorakit``; each module imports its library (an optional extra) itself.
"""

from lorakit.integrations.hf_trainer import LorakitCallback

__all__ = ["LorakitCallback"]
