"""Learning-rate schedules: linear warmup, then linear or cosine decay (or constant).

lr(step) = lr_max * f(step), with step counting completed optimizer steps:

    f(s) = s / warmup                                   for s < warmup       (linear warmup)
    f(s) = max(0, (T - s) / (T - warmup))               linear decay to 0 at T = total steps
    f(s) = 0.5 * (1 + cos(pi * (s - warmup) / (T - warmup)))   cosine decay (Loshchilov & Hutter 2017)
    f(s) = 1                                            constant

(the shapes of Hugging Face's ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``).
The factor is a small picklable-free object whose state is three integers, so the scheduler's
``state_dict`` is plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupDecay:
    """f(step) for LambdaLR (see the module docstring)."""

    warmup: int
    total: int
    kind: str = "linear"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 0.0) / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)


def warmup_steps(total: int, ratio: float, steps: int | None = None) -> int:
    """Warmup length: ``steps`` if given, else ceil(ratio * total) (HF's rounding)."""
    return int(steps) if steps is not None else math.ceil(ratio * total)


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str = "linear"):
    """A LambdaLR applying ``WarmupDecay(warmup, total, kind)`` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup, total, kind))
