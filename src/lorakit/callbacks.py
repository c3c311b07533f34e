"""Trainer callbacks: the only way per-step method logic (e.g. AdaLoRA's rank budget) enters the loop.

The trainer knows nothing about adapter methods (STYLE.md rule 7). It asks
``lorakit.adapters.base.method_callbacks(model)`` for the callbacks the model's adapter methods need and
calls every callback at these points of each optimizer step:

    loss = task_loss + sum(cb.extra_loss(state) for cb in callbacks)   # e.g. a regulariser
    loss.backward()                     (repeated over gradient-accumulation micro-batches)
    cb.on_after_backward(state)         gradients of the full step are present (unclipped)
    optimizer.step(); scheduler.step()
    cb.on_step_end(state)               gradients still present; before optimizer.zero_grad()

A step the trainer skips (a non-finite loss or gradient norm, ``lorakit.train.nonfinite``) calls neither
``on_after_backward`` nor ``on_step_end``, but ``state.step`` still advances: a callback keyed on exact steps
must catch up at the next call it gets (AdaLoRA's final masking does).

Users of their own loop call the same hooks (see ``lorakit.adapters.adalora`` for the one-call form).

The protocol sits at the bottom of the package so the adapters that need callbacks (AdaLoRA) can
subclass it without importing the trainer; ``lorakit.train.callbacks`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    """What callbacks see. ``step`` counts completed optimizer steps (0 before the first)."""

    model: nn.Module
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    optimizer: torch.optim.Optimizer | None = None
    loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # written to metrics.jsonl by the trainer
    summary: dict[str, Any] = field(default_factory=dict)  # entries added to summary.json at the end


class Callback:
    """Base class with no-op hooks; override what you need. ``state_dict``/``load_state_dict`` are
    saved in and restored from training checkpoints so resumed runs continue exactly."""

    def on_train_begin(self, state: TrainState) -> None: ...

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        return None

    def on_after_backward(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
