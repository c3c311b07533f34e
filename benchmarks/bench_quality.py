"""Results a user can trust (issue 19): accuracy on MiniLM + SST-2 for the shipped config, the lr rule and
the methods, each configuration trained in its own process (``lorakit.recipes.compare.run_compare``).

    python benchmarks/bench_quality.py sst2                     # shipped config vs full fine-tuning
    python benchmarks/bench_quality.py lr --rows 2000           # lr sweep, full vs LoRA, and what auto picks
    python benchmarks/bench_quality.py methods --seeds 0,1,2    # LoRA vs DoRA vs QLoRA at equal settings

Every suite starts from ``configs/minilm_sst2.yaml`` (MiniLM all-linear LoRA r 8, one epoch, evaluated on
the full 872-row GLUE dev split) with ``--rows`` training rows (default: the config's 6,000) and changes
one thing per configuration:

* ``sst2``: the config as shipped vs full fine-tuning (``adapter: {method: full}``, training.lr auto =
  2e-4) on the same rows, ``--rounds`` interleaved rounds (config, full, config, full, ...), so drift on
  a busy machine hits both alike. Reported: dev accuracy and wall time (summary.json ``wall_time_s``:
  setup to the last evaluation) of every run, and their medians.
* ``lr``: full fine-tuning and LoRA at each rate of ``--full-lrs`` / ``--lora-lrs`` and at ``auto``.
* ``methods``: lora, dora and qlora (LoRA on an NF4 base, classifier and pooler kept full precision) with
  the same targets, rank, lr and data, for each seed of ``--seeds``; mean and per-seed accuracy, and
  each method's gap to LoRA in points.

Wall times on a shared CPU are only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "minilm_sst2.yaml")


def base_config(rows: int | None, seed: int = 0) -> dict:
    from lorakit.train.config import load_run_config

    over = [f"training.seed={seed}", "output.save_every=0", "output.plot=false", "training.num_workers=0"]
    if rows:
        over.append(f"data.max_train_rows={rows}")
    return load_run_config(CONFIG, over).to_dict()


def with_(cfg: dict, **sections) -> dict:
    out = copy.deepcopy(cfg)
    for section, changes in sections.items():
        if changes is None:
            out.pop(section, None)
        else:
            out[section] = {**(out.get(section) or {}), **changes} if section != "adapter" else changes
    return out


def _run(configs: dict[str, dict], out: str) -> dict[str, dict]:
    from lorakit.recipes.compare import run_compare

    return {r["name"]: r for r in run_compare(configs, out)}


def suite_sst2(args) -> list[str]:
    base = base_config(args.rows)
    full = with_(base, adapter={"method": "full"}, training={**base["training"], "lr": "auto"})
    acc: dict[str, list] = {"config": [], "full": []}
    for i in range(args.rounds):
        rows = _run({f"config_{i}": base, f"full_{i}": full}, os.path.join(args.out, f"round{i}"))
        for side in acc:
            r = rows[f"{side}_{i}"]
            acc[side].append((r["metric"], r["train_seconds"], r["lr"]))
    lines = ["| setup | dev accuracy per round | wall s per round | median acc | median wall s |", "|---|---|---|---|---|"]
    for side, runs in acc.items():
        lines.append(
            f"| {side} (lr {runs[0][2]:g}) | {', '.join(f'{a:.4f}' for a, _, _ in runs)} | "
            f"{', '.join(f'{s:.0f}' for _, s, _ in runs)} | {statistics.median(a for a, _, _ in runs):.4f} | "
            f"{statistics.median(s for _, s, _ in runs):.0f} |"
        )
    return lines


def suite_lr(args) -> list[str]:
    base = base_config(args.rows)
    configs = {}
    for method, lrs in (("full", args.full_lrs), ("lora", args.lora_lrs)):
        adapter = {"method": "full"} if method == "full" else base["adapter"]
        for lr in [*lrs.split(","), "auto"]:
            value = lr if lr == "auto" else float(lr)
            configs[f"{method}_{lr}"] = with_(base, adapter=adapter, training={**base["training"], "lr": value})
    rows = _run(configs, os.path.join(args.out, "lr"))
    lines = ["| setup | lr | dev accuracy | train loss first -> last | learned |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['lr']:g} | {r['metric']:.4f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{r['learned']} |")
    return lines


def suite_methods(args) -> list[str]:
    from lorakit.recipes.compare import derive_configs

    acc: dict[str, list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        derived = derive_configs(base_config(args.rows, seed), args.methods.split(","), lr=None)
        rows = _run({f"{m}_s{seed}": c for m, c in derived.items()}, os.path.join(args.out, f"seed{seed}"))
        for m in derived:
            acc.setdefault(m, []).append(rows[f"{m}_s{seed}"]["metric"])
    ref = statistics.mean(acc.get("lora", [float("nan")]))
    lines = ["| method | dev accuracy per seed | mean | gap to LoRA (points) |", "|---|---|---|---|"]
    for m, a in acc.items():
        mean = statistics.mean(a)
        lines.append(f"| {m} | {', '.join(f'{x:.4f}' for x in a)} | {mean:.4f} | {100 * (mean - ref):+.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=("sst2", "lr", "methods"))
    p.add_argument("--rows", type=int, default=None, help="training rows (default: the config's)")
    p.add_argument("--rounds", type=int, default=2, help="sst2: interleaved rounds")
    p.add_argument("--full-lrs", default="5e-5,2e-4,1e-3")
    p.add_argument("--lora-lrs", default="2e-4,1e-3,3e-3")
    p.add_argument("--methods", default="lora,dora,qlora")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="/tmp/lorakit_bench_quality")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    lines = {"sst2": suite_sst2, "lr": suite_lr, "methods": suite_methods}[args.suite](args)
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.out, f"{args.suite}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"{args.suite}.json"), "w") as f:
        json.dump({"args": vars(args), "table": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
