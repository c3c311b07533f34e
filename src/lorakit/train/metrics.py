"""What a run reports: metrics.jsonl (one JSON object per logged step or evaluation), peak memory,
the loss / eval curve PNG and the summary.

Peak memory is the process's peak resident set size (``lorakit.bench.memory.peak_rss_mib``: VmHWM, which,
unlike ru_maxrss, a child process does not inherit) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (rank 0 only); on resume drops records after the checkpoint."""

    def __init__(self, path: str | None, resume_step: int | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path and resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.records = [
                    r for r in map(json.loads, filter(str.strip, f)) if r.get("step", 0) <= resume_step
                ]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(tmp, path)
        elif path:
            open(path, "w").close()

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(clean)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS of this process in MiB, plus CUDA max allocated on a GPU."""
    from lorakit.bench.memory import peak_rss_mib

    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def plot_curves(records: list[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Train loss (and eval loss / accuracy) against step, written as a PNG with matplotlib's Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - only without the hf extra
        return None
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [r for r in records if "eval_loss" in r or "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", lw=1)
    ekey = "eval_loss" if any("eval_loss" in r for r in evals) else None
    if ekey:
        ax.plot(
            [r["step"] for r in evals], [r[ekey] for r in evals], "o-", label="eval loss", color="tab:orange"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    acc = [(r["step"], r["eval_accuracy"]) for r in evals if "eval_accuracy" in r]
    handles, labels = ax.get_legend_handles_labels()
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as aligned text lines."""
    lines = ["", "== training summary =="]
    for key in (
        "steps",
        "skipped_steps",
        "train_loss",
        "wall_time_s",
        "tokens_per_s",
        "peak_rss_mib",
        "cuda_max_allocated_mib",
        "adapter_dir",
        "world_size",
    ):
        if key in summary and summary[key] is not None:
            lines.append(f"{key:<24} {summary[key]}")
    for tag in ("eval_before", "eval_after"):
        if summary.get(tag):
            vals = ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary[tag].items()
            )
            lines.append(f"{tag:<24} {vals}")
    eff = summary.get("efficiency")
    if eff:
        lines.append(
            f"{'trainable params':<24} {eff['trainable_params']:,} of {eff['total_params']:,} "
            f"({100 * eff['ratio']:.4f}%)"
        )
    return "\n".join(lines)
