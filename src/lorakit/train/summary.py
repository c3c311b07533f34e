"""How a run ends: its summary (summary.json, the loss curve, the printed table) and its ``TrainResult``.

A resumed run whose checkpoint is the last step and whose summary.json exists is already complete: it
reports what that summary recorded, and nothing is retrained.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lorakit.train import checkpoint as ckpt
from lorakit.train.metrics import format_summary, plot_curves
from lorakit.train.progress import Progress


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str | None
    steps: int
    skipped_steps: int
    train_loss: float | None
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    summary: dict[str, Any] = field(default_factory=dict)


def start_line(
    model: str, report: Any, precision: Any, loss: Any, steps: int, rows: int, device: Any, compiled: str = "off"
) -> str:
    """The line a run prints before its first step: trainable parameters, the precision and loss path
    chosen (and why), the steps, the device, and what ``training.compile`` compiled (``compiled_blocks``)."""
    compile_note = "" if compiled == "off" else f"; compiled {compiled} (the first step compiles: tens of seconds on a CPU)"
    return (
        f"model {model}: {report.trainable_params:,} trainable of {report.total_params:,} parameters "
        f"({100 * report.ratio:.4f}%); precision {precision.name} ({precision.why}); loss {loss.path} "
        f"({loss.why}); {steps} steps of {rows} rows; device {device}{compile_note}"
    )


def run_summary(
    progress: Progress,
    steps: int,
    elapsed: float,
    start_tokens: int,
    setup: dict[str, Any],
    memory: dict[str, float],
    adapter_dir: str | None,
    rank_diff: float | None,
    efficiency: dict[str, Any],
) -> dict[str, Any]:
    """The summary of a run that trained from ``start_tokens`` to ``progress.tokens`` in ``elapsed``
    seconds. ``setup``: world size, global batch, precision and device; ``memory``: the peaks
    (``lorakit.train.metrics.peak_memory``); ``efficiency``: the parameter report (without per-layer rows)."""
    pg = progress
    return {
        "steps": steps,
        "skipped_steps": pg.skipped,
        "train_loss": pg.last_loss,
        "wall_time_s": round(elapsed, 2),
        "tokens": pg.tokens,
        "tokens_per_s": round((pg.tokens - start_tokens) / max(elapsed, 1e-9), 1),
        **setup,
        **memory,
        "adapter_dir": adapter_dir,
        "eval_before": pg.eval_before,
        "eval_after": pg.last_eval,
        "rank_max_abs_diff": rank_diff,
        "efficiency": {k: v for k, v in efficiency.items() if k != "layers"},
    }


def write_summary(
    summary: dict[str, Any], out: str, records: list[dict[str, Any]], plot: bool, title: str
) -> None:
    """summary.json into ``out``, the loss curve beside it when ``plot``, and the summary printed."""
    ckpt.write_json(summary, os.path.join(out, "summary.json"))
    if plot:
        plot_curves(records, os.path.join(out, "loss_curve.png"), title=title)
    print(format_summary(summary))


def result_of(out: str, summary: dict[str, Any], progress: Progress, steps: int) -> TrainResult:
    return TrainResult(
        out,
        summary["adapter_dir"],
        steps,
        progress.skipped,
        progress.last_loss,
        progress.eval_before,
        progress.last_eval,
        summary,
    )


def already_complete(out: str, step: int, total: int, is_main: bool) -> TrainResult | None:
    """``--resume`` of a run that has finished (its last step checkpointed and summary.json written):
    say so and return what it recorded; None when the run is not complete."""
    path = os.path.join(out, "summary.json")
    if step < total or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        s = json.load(f)
    if is_main:
        print(
            f"the run in {out} is already complete ({step} of {total} steps); "
            f"nothing to do. Its adapter: {s.get('adapter_dir')}"
        )
    return TrainResult(
        out, s.get("adapter_dir"), s.get("steps", step), s.get("skipped_steps", 0),
        s.get("train_loss"), s.get("eval_before"), s.get("eval_after"), s,
    )
