"""``lorakit plan``: memory, GPUs, time, cost, ROI and recommendations for a fine-tune (no training)."""

from __future__ import annotations

import argparse

from lorakit.cli.arguments import arguments_from, call_with

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def count(text: str) -> int:
    """A whole number as people write large ones: 10000000, 10_000_000, 1e7, 10M, 2.5B."""
    t = text.strip().replace("_", "").replace(",", "")
    scale = _SUFFIX.get(t[-1:].lower(), 1.0) if t else 1.0
    try:
        value = float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 10000000, 1e7 or 10M)") from None
    if not value.is_integer() or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.cli.common import parse_targets
    from lorakit.planner.calibrate import calibrate
    from lorakit.planner.cost import DEFAULT_MFU
    from lorakit.planner.plan import CHOICES, plan
    from lorakit.planner.ref_sizes import REFERENCE_SIZES

    sizes = " ".join(REFERENCE_SIZES)
    overrides = {
        # --model may be left out with --calibrate; run() asks for it when a plan needs it
        "model": {"required": False, "help": f"HF model directory, builtin name, or a size: {sizes}"},
        "tokens": {"type": count, "examples": "10000000, 1e7, 10M"},
        "dataset_rows": {"type": count, "examples": "50000, 5e4, 50k"},
        "targets": {"type": parse_targets},
        "mfu": {"shown_default": DEFAULT_MFU},
        "grad_checkpointing": {"help": "keep all activations"},  # the help of --no-grad-checkpointing
    }
    names = arguments_from(
        plan, parser, overrides, choices=CHOICES, exclusive=[("tokens", "dataset_rows")], skip=_NOT_OFFERED
    )
    parser.set_defaults(_plan_parameters=names)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--report", default=None, metavar="DIR", help="write plan.md, plan_chart.png, plan.json")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine: predicted vs measured peak memory and step time (llama-15m); with "
        "--distributed fsdp: the per-rank memory of a 2-process FSDP run (--model: a builtin, default llama-15m)",
    )
    arguments_from(
        calibrate, parser, {"steps": {"help": "timed steps for --calibrate"}}, only=["steps"], prefix="calibrate"
    )


# plan() parameters the command line leaves at their defaults
_NOT_OFFERED = ("serving_hours_per_month", "task")


def run(args: argparse.Namespace) -> int:
    if args.calibrate and args.distributed == "fsdp":
        from lorakit.planner.calibrate_fsdp import calibrate_fsdp

        result = calibrate_fsdp(model=args.model or "llama-15m")
        print(result.table())
        return 0 if result.ok else 1
    if args.calibrate:
        from lorakit.planner.calibrate import calibrate

        print(calibrate(steps=args.calibrate_steps).table())
        return 0
    from lorakit.planner.arch import PlanError
    from lorakit.planner.plan import plan
    from lorakit.planner.plan_report import table, to_json, write_report

    if args.model is None:
        raise PlanError("--model is required (a model directory, a builtin name or a size like 7B)")
    p = call_with(plan, args, args._plan_parameters)
    print(to_json(p) if args.json else table(p))
    if args.report:
        paths = write_report(p, args.report)
        print(f"\nreport: {paths['markdown']} (chart {paths['chart']}, json {paths['json']})")
    return 0

