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
  a busy machine hits both alike. Reported: dev accuracy, wall time (summary.json ``wall_time_s``:
  setup to the last evaluation) and training seconds (evaluations excluded) of every run, their medians,
  and when full fine-tuning (evaluated every ``--full-eval-every`` steps) first reaches ``--target``
  (0.823) and the config's accuracy: time-to-accuracy, granular to that interval. The config is evaluated at
  the same interval, so its time to ``--config-target`` (0.83) is read the same way (evaluations never enter
  the training seconds, and an evaluation does not change the run: eval mode draws no random numbers).
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


def train_seconds(run_dir: str) -> tuple[dict[int, float], dict[int, float]]:
    """(training seconds up to each logged step, dev accuracy at each evaluated step) from metrics.jsonl.

    Training seconds exclude evaluation: the gap between two consecutive steps that holds an evaluation
    (after the earlier one) counts as the median step gap instead, so a run evaluated every K steps (to
    find when it reaches an accuracy) and one evaluated only at the end are timed alike."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [(r["step"], r["elapsed_s"]) for r in records if "elapsed_s" in r]
    evals = {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}
    gaps = [(s, b - a) for (_, a), (s, b) in zip([(0, 0.0), *steps], steps)]
    typical = statistics.median(g for _, g in gaps)
    seconds, total = {}, 0.0
    for s, g in gaps:
        total += typical if (s - 1) in evals else g
        seconds[s] = total
    return seconds, evals


def time_to(seconds: dict[int, float], evals: dict[int, float], target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or above ``target`` (None: never reached)."""
    for step in sorted(evals):
        if step > 0 and evals[step] >= target:
            return step, seconds[step]
    return None


def suite_sst2(args) -> list[str]:
    shipped = base_config(args.rows)
    base = with_(shipped, training={**shipped["training"], "eval_every": args.full_eval_every})
    full = with_(base, adapter={"method": "full"}, training={**base["training"], "lr": "auto"})
    acc: dict[str, list] = {"config": [], "full": []}
    reach: list[tuple] = []
    for i in range(args.rounds):
        out = os.path.join(args.out, f"round{i}")
        rows = _run({f"config_{i}": base, f"full_{i}": full}, out)
        timed = {}
        for side in acc:
            r = rows[f"{side}_{i}"]
            secs, evals = train_seconds(os.path.join(out, f"{side}_{i}"))
            timed[side] = (secs, evals)
            acc[side].append((r["metric"], r["train_seconds"], r["lr"], r["steps"], secs[max(secs)]))
        config_acc = acc["config"][-1][0]
        reach.append((
            time_to(*timed["full"], args.target), time_to(*timed["full"], config_acc),
            time_to(*timed["config"], args.config_target),
        ))
    lines = [
        f"rows {base['data'].get('max_train_rows')}, 1 epoch, seed 0, full dev split (872 rows); "
        f"both evaluated every {args.full_eval_every} steps to time when they reach an accuracy",
        "",
        "| setup | steps | dev accuracy per round | wall s per round | train s per round (evaluations excluded) "
        "| median acc | median train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, runs in acc.items():
        lines.append(
            f"| {side} (lr {runs[0][2]:g}) | {runs[0][3]} | {', '.join(f'{a[0]:.4f}' for a in runs)} | "
            f"{', '.join(f'{a[1]:.0f}' for a in runs)} | {', '.join(f'{a[4]:.0f}' for a in runs)} | "
            f"{statistics.median(a[0] for a in runs):.4f} | {statistics.median(a[4] for a in runs):.0f} |"
        )
    lines += ["", f"| round | config: first evaluation >= {args.config_target:g} (step, train s) | full: first "
              f"evaluation >= {args.target:g} (step, train s) | full: first evaluation >= the config's final "
              "accuracy (step, train s) |", "|---|---|---|---|"]
    for i, (t, c, mine) in enumerate(reach):
        fmt = lambda x: "not reached" if x is None else f"step {x[0]}, {x[1]:.0f} s"  # noqa: E731
        lines.append(f"| {i} | {fmt(mine)} | {fmt(t)} | {fmt(c)} |")
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
    p.add_argument("--target", type=float, default=0.823, help="sst2: the accuracy full fine-tuning is timed to")
    p.add_argument("--config-target", type=float, default=0.83, help="sst2: the accuracy the config is timed to")
    p.add_argument("--full-eval-every", type=int, default=20, help="sst2: both sides' evaluation interval")
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
