"""One configuration of ``lorakit compare``, in its own process: train, then time inference.

Usage: ``python -m lorakit.recipes.compare_worker CONFIG.json RESULT.json``. Writes one JSON row with the
columns of ``lorakit.recipes.compare.COLUMNS``. Latency is the median over ``REPEATS`` forwards of one
evaluation batch (up to 32 validation rows), after ``WARMUP`` untimed forwards, under ``torch.no_grad``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from lorakit.io.atomic import atomic_write_text
from lorakit.recipes.verdict import majority_share

WARMUP, REPEATS, EVAL_ROWS = 2, 10, 32


def _median_ms(fn) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def _step_records(metrics_path: str) -> list[dict[str, Any]]:
    """The training-step records of metrics.jsonl (evaluation records left out), in step order."""
    with open(metrics_path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _step_seconds(steps: list[dict[str, Any]]) -> float | None:
    """Median time between consecutive optimizer steps (first step excluded: warm-up)."""
    elapsed = [r["elapsed_s"] for r in steps if "elapsed_s" in r]
    gaps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return statistics.median(gaps[1:] if len(gaps) > 2 else gaps) if gaps else None


def _losses(steps: list[dict[str, Any]]) -> list[float]:
    """Training losses in step order (skipped steps' non-finite values, logged as strings, left out)."""
    return [r["loss"] for r in steps if isinstance(r["loss"], float)]


def _dir_bytes(path: str | None) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def _plain_init(cfg: Any) -> Any:
    """``cfg`` with an init computed from calibration inputs (CorDA) swapped for the default: the model built
    for timing only carries the adapter until the trained one (a plain, converted file) replaces it."""
    import dataclasses

    from lorakit import methods

    if cfg.adapter is None or not methods.init_entry(cfg.adapter).reads_inputs:
        return cfg
    own = methods.init_entry(cfg.adapter).options
    kept = {k: v for k, v in cfg.adapter.method_options.items() if k not in own}
    return dataclasses.replace(cfg, adapter=cfg.adapter.replace(init="default", method_options=kept))


def measure(raw: dict[str, Any]) -> dict[str, Any]:
    import lorakit as lk
    from lorakit.models.tokenizer import load_tokenizer, pad_id
    from lorakit.train.build import build_run_model, load_data, resolve_precision
    from lorakit.train.collate import Collator
    from lorakit.train.config import RunConfig
    from lorakit.train.evaluate import forward_loss
    from lorakit.train.trainer import train

    cfg = RunConfig.from_dict(raw)
    result = train(cfg, overwrite=True)
    out_dir = cfg.output.dir
    task = cfg.data.task
    after, before = result.eval_after or {}, result.eval_before or {}
    key = "eval_accuracy" if task == "classification" else "eval_perplexity"
    metric_name, metric = key.removeprefix("eval_"), after.get(key)
    eff = result.summary.get("efficiency", {})

    # Inference latency: a fresh process-local model with the trained adapter, one eval batch.
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    train_ds, val_ds, _ = load_data(cfg, tok)
    ds = val_ds if val_ds is not None else train_ds
    batch = Collator(pad_id(tok), "group", None, task)([ds[i] for i in range(min(EVAL_ROWS, len(ds)))])
    device = torch.device("cpu")
    num_labels = len(train_ds.label_names or []) if task == "classification" else 0
    model = build_run_model(_plain_init(cfg), num_labels, pad_id(tok), resolve_precision("fp32", device), device)
    has_adapter = cfg.adapter is not None and result.adapter_dir is not None
    if has_adapter:
        lk.delete_adapter(model, lk.active_adapter(model))
        lk.load_adapter(model, result.adapter_dir)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            forward_loss(model, batch, task)

    unmerged = _median_ms(forward)
    merged = None
    if has_adapter:
        lk.merge(model)
        merged = _median_ms(forward)
    else:
        merged = unmerged  # full fine-tuning has nothing to merge
    steps = _step_records(os.path.join(out_dir, "metrics.jsonl"))
    losses = _losses(steps)
    labels = [ex["labels"] for ex in ds.examples] if task == "classification" else []
    return {
        "method": "full" if cfg.adapter is None else (cfg.adapter.method + ("+nf4" if cfg.quant else "")),
        "metric_name": metric_name,
        "metric": metric,
        "metric_before": before.get(key),
        "baseline": majority_share(labels) if task == "classification" else before.get(key),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "steps": result.steps,
        "lr": (result.summary.get("lr_auto") or {}).get("lr", cfg.training.lr),  # the rate it trained with
        "precision": result.summary.get("precision"),
        "trainable_params": int(eff.get("trainable_params", 0)),
        "trainable_pct": 100.0 * float(eff.get("ratio", 0.0)),
        "train_seconds": result.summary.get("wall_time_s"),
        "step_seconds": _step_seconds(steps),
        "peak_rss_mib": result.summary.get("peak_rss_mib"),
        "latency_unmerged_ms": unmerged,
        "latency_merged_ms": merged,
        "adapter_bytes": _dir_bytes(result.adapter_dir),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lorakit.recipes.compare_worker CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    with open(argv[0]) as f:
        raw = json.load(f)
    row = measure(raw)
    atomic_write_text(argv[1], json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
