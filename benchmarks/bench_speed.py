"""Issue 16 items 4 and 5: the QLoRA step with bf16 compute vs PEFT + bitsandbytes, and the decode-shape
forward vs PEFT and vs the plain base model.

    python -m benchmarks.bench_speed [--suite cpu-speed] [--out benchmarks/results]

Runs the harness (``benchmarks.run``: every case/side in its own process, rounds interleaved lorakit,
PEFT, PEFT, lorakit, ...) on cases ``qlora_qv`` (llama-15m, 8 x 256 tokens, NF4 + double quant, bf16
compute, LoRA r 8 on q,v, forward + backward + AdamW), ``qlora_qv_compile`` (the same lorakit step with
``training.compile: true``'s regional compilation, the first step's compile in the warm-up), ``qlora_qv_bf16``
(both steps under bf16 autocast, as lorakit's and HF's trainers run them on a bf16 CPU) and ``decode`` (32 rows x 1 token, eval, no grad),
then prints each goal with its measured ratio in wall time and in process CPU time (CPU time is what to
trust on a shared machine: a descheduled process does not accrue it). Goals: QLoRA step <= 0.9x PEFT +
bitsandbytes with the step-1 loss equal to 1e-2; decode <= 1.0x PEFT and <= 1.1x the plain base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from benchmarks.run import markdown, run_suite
from benchmarks.suites import SUITES

GOALS = (  # (label, ratio key path, goal): measured ratio <= goal
    ("QLoRA step vs PEFT+bnb, wall", ("qlora_qv", "time_vs_peft"), 0.9),
    ("QLoRA step vs PEFT+bnb, CPU", ("qlora_qv", "cpu_time_vs_peft"), 0.9),
    ("QLoRA |loss@1 - PEFT's|", ("qlora_qv", "loss_step1_diff"), 1e-2),
    ("QLoRA step under bf16 autocast (each trainer's default) vs PEFT+bnb, wall", ("qlora_qv_bf16", "time_vs_peft"), 0.9),
    ("QLoRA step under bf16 autocast vs PEFT+bnb, CPU", ("qlora_qv_bf16", "cpu_time_vs_peft"), 0.9),
    ("QLoRA under autocast |loss@1 - PEFT's|", ("qlora_qv_bf16", "loss_step1_diff"), 1e-2),
    ("QLoRA step, training.compile, vs PEFT+bnb, wall", ("qlora_qv_compile", "time_vs_peft"), 0.9),
    ("QLoRA step, training.compile, vs PEFT+bnb, CPU", ("qlora_qv_compile", "cpu_time_vs_peft"), 0.9),
    ("QLoRA compiled |loss@1 - PEFT's|", ("qlora_qv_compile", "loss_step1_diff"), 1e-2),
    ("decode vs PEFT, wall", ("decode", "vs_peft"), 1.0),
    ("decode vs PEFT, CPU", ("decode", "cpu_vs_peft"), 1.0),
    ("decode vs PEFT, each over its own plain base, wall", ("decode", "vs_peft_same_base"), 1.0),
    ("decode vs PEFT, each over its own plain base, CPU", ("decode", "cpu_vs_peft_same_base"), 1.0),
    ("decode vs plain base, wall", ("decode", "vs_base"), 1.1),
    ("decode vs plain base, CPU", ("decode", "cpu_vs_base"), 1.1),
)


def goal_lines(res: dict[str, Any]) -> list[str]:
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for label, (case, key), target in GOALS:
        v = res["ratios"].get(case, {}).get(key)
        met = "—" if v is None else ("yes" if v <= target else "no")
        lines.append(f"| {label} | {'—' if v is None else format(v, '.3g')} | <= {target:g} | {met} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="cpu-speed", choices=sorted(SUITES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    res = run_suite(args.suite, ["qlora_qv", "qlora_qv_bf16", "qlora_qv_compile", "decode"])
    md = markdown(res) + "\n" + "\n".join(goal_lines(res)) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"speed-{args.suite}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.out, f"speed-{args.suite}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
