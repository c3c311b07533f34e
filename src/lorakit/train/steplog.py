"""What a run says while it trains: one metrics.jsonl record per logged step or evaluation (rank 0 only)
and the progress bar on stderr.

A step record holds the step, epoch, loss, the learning rate that step used, the gradient norm (None for a
skipped step), the real tokens trained on so far, this step's tokens per second, the seconds since the
loop began, and whatever callbacks put in ``TrainState.metrics``.

``sinks`` (the experiment trackers of ``lorakit.train.tracking``) get each record as metrics.jsonl holds it,
when it is written there, so a tracker and the file cannot disagree.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lorakit.train.metrics import MetricsLog
from lorakit.train.tracking import Tracker


class StepLog:
    """The metrics log (``path`` None on ranks other than 0) and, when asked for, the progress bar."""

    def __init__(
        self,
        path: str | None,
        resume_step: int | None,
        log_every: int,
        total: int,
        sinks: Sequence[Tracker] = (),
    ) -> None:
        """``resume_step``: a resumed run's step, whose later records ``path`` drops (None: a new log).
        ``sinks``: trackers fed every record written (rank 0 only: pass none where ``path`` is None)."""
        self.metrics = MetricsLog(path, resume_step)
        self.sinks = list(sinks)
        self.log_every, self.total = log_every, total
        self.bar: Any = None
        self.start = time.perf_counter()

    def open_bar(self, initial: int) -> None:
        """Show a progress bar of the ``total`` steps on stderr, ``initial`` of them done."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.metrics.records

    def start_clock(self) -> None:
        """The loop begins now (``elapsed_s`` counts from here)."""
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def pause(self) -> None:
        """The run's directory is about to move: the trackers close what they hold open in it."""
        for sink in self.sinks:
            sink.pause()

    def move(self, path: str) -> None:
        """The run's directory moved (an --overwrite run swapped in): append to ``path`` from now on."""
        if self.metrics.path and self.metrics.path != path:
            self.metrics.path = path
            for sink in self.sinks:
                sink.move(os.path.dirname(path))

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for sink in self.sinks:
            sink.log(self.metrics.records[-1])  # the cleaned record, exactly as metrics.jsonl has it

    def finish_sinks(self, artifacts: Sequence[str]) -> None:
        """The run ended: hand the trackers its artifacts (files that exist) and close them."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.finish([a for a in artifacts if os.path.isfile(a)])

    def abort_sinks(self) -> None:
        """The run failed: close the trackers, marking the run failed where the tool has a status."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.abort()
            except Exception as e:  # the run's own error matters more than a tracker's
                print(f"warning: closing {type(sink).__name__} failed: {e}", file=sys.stderr)

    def step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        norm: float | None,
        tokens: int,
        real: int,
        seconds: float,
        extra: dict[str, Any],
    ) -> None:
        """Log optimizer step ``step`` (every ``log_every`` and the last) and advance the bar."""
        rate = real / max(seconds, 1e-9)
        if self.metrics.path is not None and (step % self.log_every == 0 or step == self.total):
            self._write(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens": tokens,
                    "tokens_per_s": rate,
                    "elapsed_s": self.elapsed(),
                    **extra,
                }
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            self.bar.update(1)

    def evaluation(self, step: int, metrics: dict[str, float] | None) -> None:
        """Log the evaluation metrics at ``step`` (None: there was no validation set)."""
        if metrics and self.metrics.path is not None:
            self._write({"step": step, **metrics})

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
