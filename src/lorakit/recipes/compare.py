"""``lorakit compare``: train and evaluate several configurations side by side.

Each configuration runs in its own process (``python -m lorakit.recipes.compare_worker``), so peak
memory figures are clean. Reported per configuration: the task metric (accuracy for classification,
perplexity for causal LM), trainable parameters and share, training time and median step time, peak
RSS, inference latency unmerged and merged (median over repeated forwards of one evaluation batch),
and adapter file size. Output: ``compare.md`` (table), ``compare.json`` and ``compare_*.png`` charts.

``--methods full,lora,dora,qlora,adalora`` (any of ``lorakit.methods.setups()``) derives the configurations from one base config:
full = every base parameter trains (no adapter); qlora = the base config's adapter on an NF4 base;
dora/adalora = the same targets and rank with that method (AdaLoRA: init_r = 1.5 r -> target_r = r).

Learning rate: each derived configuration trains with ``training.lr: auto`` (a rate for its method and
model size, ``lorakit.train.lr_rule``: full fine-tuning needs a rate about 5x lower than an adapter, so
one shared rate would cripple one side), unless ``--set training.lr=...`` says otherwise. Configuration
files given without ``--methods`` keep the lr they set, and use auto when they set none.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from lorakit.methods import setups, variant
from lorakit.recipes.verdict import verdict

COLUMNS = ("name", "method", "metric_name", "metric", "metric_before", "baseline", "learned", "verdict",
           "loss_first", "loss_last", "steps", "lr", "precision", "trainable_params", "trainable_pct",
           "train_seconds", "step_seconds", "peak_rss_mib", "latency_unmerged_ms", "latency_merged_ms",
           "adapter_bytes")
def lr_is_set(path: str | None, overrides: Sequence[str]) -> bool:
    """Whether a ``--set training.lr=...`` override, or the config file at ``path``, names training.lr."""
    if any(o.split("=", 1)[0].strip() == "training.lr" for o in overrides):
        return True
    if path is None:
        return False
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    training = data.get("training") if isinstance(data, dict) else None
    return isinstance(training, dict) and training.get("lr") is not None


def derive_configs(
    base: dict[str, Any], methods: Sequence[str], lr: float | str | None = "auto"
) -> dict[str, dict[str, Any]]:
    """One run config (dict) per setup in ``methods`` (any of ``lorakit.methods.setups()``: the registered
    methods and their variants, e.g. full and qlora), derived from ``base`` (a loaded YAML run config).
    ``lr`` goes into every one (default "auto": each method's own rate); None keeps the base config's."""
    known = setups()
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m not in known:
            raise ValueError(f"--methods: unknown method {m!r}; expected some of {list(known)}")
        cfg = copy.deepcopy(base)
        adapter = dict(cfg.get("adapter") or {})
        cfg.pop("quant", None)
        v = variant(m)
        if v is not None and v.method is None:  # full fine-tuning
            cfg["adapter"] = {"method": m}
        elif v is not None and v.quantized:  # the method on an NF4 base (LoftQ: with its init)
            adapter.update(v.adapter_fields(adapter))
            cfg["adapter"] = adapter
            skip = list(adapter.get("modules_to_save") or []) + ["classifier", "score", "lm_head", "pooler.dense"]
            cfg["quant"] = {"dtype": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32",
                            "skip": sorted(set(skip))}
        elif v is not None:  # the method with an init or options of its own (OLoRA, LoRA+)
            adapter.update(v.adapter_fields(adapter))
            cfg["adapter"] = adapter
        elif m == "adalora":
            r = int(adapter.get("r", 8))
            adapter.update(method="adalora", init_r=max(r + 1, (3 * r) // 2), target_r=r, dropout=0.0)
            cfg["adapter"] = adapter
        else:
            adapter["method"] = m
            cfg["adapter"] = adapter
        if lr is not None:
            cfg.setdefault("training", {})["lr"] = lr
        out[m] = cfg
    return out


def run_compare(configs: dict[str, dict[str, Any]], out_dir: str, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """Run each named config in its own process; write compare.json / compare.md / charts."""
    from lorakit.io.atomic import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for name, cfg in configs.items():
        run_dir = os.path.join(out_dir, name)
        cfg = copy.deepcopy(cfg)
        cfg.setdefault("output", {})["dir"] = run_dir
        cfg["output"]["progress"] = False
        cfg_path = os.path.join(out_dir, f"{name}.config.json")
        res_path = os.path.join(out_dir, f"{name}.result.json")
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2))
        print(f"[compare] {name}: training in its own process ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lorakit.recipes.compare_worker", cfg_path, res_path],
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(res_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"compare: configuration {name!r} failed: {tail[0]}")
        with open(res_path) as f:
            row = json.load(f)
        row["name"] = name
        row["learned"], row["verdict"] = verdict(row)
        rows.append({k: row.get(k) for k in COLUMNS})
        if not row["learned"]:
            print(f"[compare] {name}: {row['verdict']}", flush=True)
        print(f"[compare] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    atomic_write_text(os.path.join(out_dir, "compare.json"), json.dumps(rows, indent=2))
    atomic_write_text(os.path.join(out_dir, "compare.md"), markdown_table(rows))
    plot_compare(rows, out_dir)
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that learned, best metric first (accuracy: higher; perplexity: lower), then the rest as run."""
    good = [r for r in rows if r.get("learned") and r.get("metric") is not None]
    sign = -1.0 if (good and good[0]["metric_name"] == "accuracy") else 1.0
    good.sort(key=lambda r: sign * r["metric"])
    return good + [r for r in rows if r not in good]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """compare.md: learned rows ranked, rows that did not learn listed apart with the likely cause; every
    metric with the same precision, beside its value before training and the no-skill baseline."""
    name = rows[0]["metric_name"] if rows else "metric"
    baseline = "majority class" if name == "accuracy" else "untrained"
    head = (f"| config | {name} before -> after | baseline ({baseline}) | trainable | train s | step s | "
            "peak RSS MiB | latency ms (unmerged / merged) | adapter KiB |\n|---|---|---|---|---|---|---|---|---|\n")
    body, notes = "", []
    for r in ranked(rows):
        metric = f"{_fmt(r.get('metric_before'), '.4f')} -> {_fmt(r['metric'], '.4f')}"
        if not r.get("learned", True):
            metric += " (not learned)"
            notes.append(f"- {r['name']}: {r.get('verdict')}")
        body += (f"| {r['name']} | {metric} | {_fmt(r.get('baseline'), '.4f')} | {r['trainable_params']:,} "
                 f"({_fmt(r['trainable_pct'], '.3f')}%) | {_fmt(r['train_seconds'], '.1f')} | "
                 f"{_fmt(r['step_seconds'], '.3f')} | {_fmt(r['peak_rss_mib'], '.0f')} | "
                 f"{_fmt(r['latency_unmerged_ms'], '.2f')} / {_fmt(r['latency_merged_ms'], '.2f')} | "
                 f"{_fmt((r['adapter_bytes'] or 0) / 1024, '.1f')} |\n")
    tail = ("\nNot ranked (they did not learn):\n" + "\n".join(notes) + "\n") if notes else ""
    return head + body + tail


def plot_compare(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """compare_metric.png (metric vs trainable params), compare_latency.png, compare_memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        ax.scatter(max(r["trainable_params"], 1), r["metric"] if r["metric"] is not None else float("nan"), s=50)
        ax.annotate(r["name"], (max(r["trainable_params"], 1), r["metric"] or 0), textcoords="offset points",
                    xytext=(6, 6 + 11 * (i % 3)))  # staggered: configs with similar sizes cluster
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(rows[0]["metric_name"] if rows else "metric")
    ax.set_title("task metric vs trainable parameters")
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "compare_metric.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["latency_unmerged_ms"] or 0 for r in rows], 0.4, label="unmerged")
    ax.bar([x + 0.2 for x in xs], [r["latency_merged_ms"] or 0 for r in rows], 0.4, label="merged")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms per evaluation batch (median)")
    ax.set_title("inference latency")
    ax.legend()
    paths.append(os.path.join(out_dir, "compare_latency.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [r["peak_rss_mib"] or 0 for r in rows], color="tab:purple")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("training peak memory")
    paths.append(os.path.join(out_dir, "compare_memory.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
