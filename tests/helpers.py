"""Small helpers shared by tests (importable as ``helpers``: tests/ is on pythonpath)."""

import torch


def logits_of(out) -> torch.Tensor:
    """Logits (or last hidden state) of a transformers model output."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out
