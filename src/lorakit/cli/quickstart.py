"""``lorakit quickstart``: adapt a real pretrained model to a generated task, offline, in minutes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    from lorakit.recipes.quickstart import quickstart_methods

    parser.add_argument("--method", default="lora", choices=list(quickstart_methods()),
                        help="adapter method, or qlora (LoRA on an NF4-quantized base); default lora")
    parser.add_argument("--size", default="full", choices=["tiny", "small", "full"],
                        help="data size / epochs (tiny and small are for tests and slow machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lorakit.recipes.quickstart import run_quickstart

    r = run_quickstart(args.out, args.method, args.size, seed=args.seed, progress=not args.no_progress)
    mem = f"{r.peak_memory_mb:.0f} MB" if r.peak_memory_mb else "n/a"
    print()
    print(f"quickstart ({r.method}) done in {r.wall_seconds:.1f} s")
    print(f"  test accuracy: {100 * r.accuracy_before:.1f}% -> {100 * r.accuracy_after:.1f}% "
          f"(chance {100 * r.chance:.1f}%)")
    print(f"  trainable: {r.trainable_params:,} of {r.total_params:,} parameters "
          f"({100 * r.trainable_params / max(r.total_params, 1):.2f}%)")
    print(f"  peak memory: {mem}; adapter on disk: {r.adapter_bytes / 1024:.1f} KiB")
    print(f"  report: {r.report_path}")
    return 0
