"""The trainer's rule for steps it must not apply: a loss or a gradient norm that is not finite.

Such a step is skipped on every rank (the check rides on the loss all-reduce), leaves the optimizer state
untouched and counts toward ``training.max_nonfinite``. One exception: under fp16 loss scaling, gradients
that overflow while the scale is above 1 are GradScaler's normal search for a scale, not a sick model: the
step is skipped and the scale halved as ``GradScaler.step`` would, but it does not count (at most log2 of
the scale such steps come in a row). At scale <= 1 the unscaled gradients themselves overflow, and it counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Skip:
    """Why a step was skipped, and whether it counts toward ``max_nonfinite``."""

    why: str
    counts: bool = True


def grads_not_finite(params: list[torch.nn.Parameter]) -> bool:
    """True when the total gradient norm of ``params`` (this rank's, scaled or not) is inf or NaN."""
    grads = [p.grad for p in params if p.grad is not None]
    return bool(grads) and not math.isfinite(float(torch.nn.utils.get_total_norm(grads)))


def grad_skip(loss: float, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> Skip:
    """The skip of a step with a finite ``loss`` and non-finite gradients; backs an fp16 scale off.

    Under DDP the gradients were all-reduced, so every rank's scaler finds the same inf and backs off alike.
    The caller zeroes the gradients."""
    if scaler is None:
        return Skip(f"gradient norm is not finite (loss {loss:.6g} is)")
    scale = scaler.get_scale()
    scaler.unscale_(opt)  # records found-inf, which update() reads to halve the scale
    scaler.update()
    if scale > 1.0:
        return Skip(
            f"fp16 gradients overflowed at loss scale {scale:g} (now {scaler.get_scale():g})", counts=False
        )
    return Skip(f"gradient norm is not finite at loss scale {scale:g} (loss {loss:.6g} is)")
