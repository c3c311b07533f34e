"""Where a run stands, and how it goes into and comes out of a checkpoint.

``Progress`` holds the counters of the loop (data position, skipped steps, tokens, last metrics);
``run_state`` collects everything a resumed run needs to continue bit-for-bit -- progress, optimizer,
scheduler, grad scaler, RNG states, callback states -- and ``restore_run`` puts it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.train import checkpoint as ckpt
from lorakit.train.callbacks import Callback


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


def run_state(run: Any) -> dict[str, Any]:
    """The resumable state of a trainer run (``lorakit.train.trainer``)."""
    return {
        "step": run.state.step,
        "global_batch": run.global_batch,
        "seed": run.cfg.training.seed,
        "progress": dataclasses.asdict(run.progress),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "rng": ckpt.rng_state(),
        "callbacks": dict(zip(callback_keys(run.callbacks), (cb.state_dict() for cb in run.callbacks))),
    }


def restore_run(run: Any, path: str) -> None:
    """Load checkpoint ``path`` into a freshly built run (adapter tensors included); RNG states last."""
    s = ckpt.load_checkpoint(path, run.model)
    for key, want in (("global_batch", run.global_batch), ("seed", run.cfg.training.seed)):
        if s[key] != want:
            raise ckpt.CheckpointError(
                f"cannot resume {path}: it was written with {key}={s[key]}, now {want}"
            )
    run.opt.load_state_dict(s["optimizer"])
    run.sched.load_state_dict(s["scheduler"])
    if run.scaler and s["scaler"]:
        run.scaler.load_state_dict(s["scaler"])
    keys = callback_keys(run.callbacks)
    for key, cb in zip(keys, run.callbacks):
        if key in s["callbacks"]:
            cb.load_state_dict(s["callbacks"][key])
    unclaimed = [k for k, v in s["callbacks"].items() if v and k not in keys]
    if unclaimed:
        raise ckpt.CheckpointError(f"cannot resume {path}: no callback to restore the state of {unclaimed}")
    run.state.step = s["step"]
    run.progress = Progress(**s["progress"])
    run.progress.saved_step = s["step"]
    ckpt.set_rng_state(s["rng"])
