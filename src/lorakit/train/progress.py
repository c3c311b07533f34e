"""Where a run stands, and how it goes into and comes out of a checkpoint.

``Progress`` holds the counters of the loop (data position, skipped steps, tokens, last metrics);
``Resumable`` holds everything a resumed run needs to continue bit-for-bit -- step, progress, optimizer,
scheduler, grad scaler, callback states (and the RNG states, taken from the process) -- and turns it
into a checkpoint's state (``state_dict``) and back (``restore``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train.callbacks import Callback, TrainState


@dataclass
class Progress:
    epoch: int = 0
    batch_index: int = 0  # global batches of this epoch already consumed
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm
    nonfinite_run: int = 0  # ... of them in a row, up to now
    tokens: int = 0  # real (non-padding) tokens trained on
    last_loss: float | None = None
    eval_before: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int = -1
    saved_step: int = -1


def callback_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Stable names for callback states: class name + index among callbacks of that class."""
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__qualname__
        keys.append(f"{name}#{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return keys


@dataclass
class Resumable:
    """The parts of a run a checkpoint saves besides the adapter tensors; the trainer owns them here.

    ``global_batch`` and ``seed`` decide the data order, so a checkpoint resumes only under the same."""

    state: TrainState  # its step counts completed optimizer steps
    progress: Progress
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    callbacks: list[Callback]
    global_batch: int
    seed: int
    optimizer_io: Any = None  # state_dict() / load_state_dict() for the optimizer, when not its own (FSDP)

    def state_dict(self) -> dict[str, Any]:
        """What ``lorakit.train.checkpoint.save_checkpoint`` writes beside the adapter (RNG states too)."""
        return {
            "step": self.state.step,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "progress": dataclasses.asdict(self.progress),
            "optimizer": (self.optimizer_io or self.optimizer).state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "callbacks": dict(zip(callback_keys(self.callbacks), (cb.state_dict() for cb in self.callbacks))),
        }

    def restore(self, path: str, model: torch.nn.Module) -> None:
        """Load checkpoint ``path`` into this freshly built run and ``model`` (adapter tensors included);
        RNG states last."""
        s = ckpt.load_checkpoint(path, model)
        for key, want in (("global_batch", self.global_batch), ("seed", self.seed)):
            if s[key] != want:
                raise ckpt.CheckpointError(
                    f"cannot resume {path}: it was written with {key}={s[key]}, now {want}"
                )
        (self.optimizer_io or self.optimizer).load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        keys = callback_keys(self.callbacks)
        for key, cb in zip(keys, self.callbacks):
            if key in s["callbacks"]:
                cb.load_state_dict(s["callbacks"][key])
        unclaimed = [k for k, v in s["callbacks"].items() if v and k not in keys]
        if unclaimed:
            raise ckpt.CheckpointError(
                f"cannot resume {path}: no callback to restore the state of {unclaimed}"
            )
        self.state.step = s["step"]
        self.progress = Progress(**s["progress"])
        self.progress.saved_step = s["step"]
        ckpt.set_rng_state(s["rng"])
