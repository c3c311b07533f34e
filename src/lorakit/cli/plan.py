"""``lorakit plan``: memory, GPUs, time, cost, ROI and recommendations for a fine-tune (no training)."""

from __future__ import annotations

import argparse

from lorakit.bench.cost import OPTIMIZERS

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
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory, builtin name, or a size: 1B 3B 7B 8B 13B 33B 65B 70B 175B",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--tokens", type=count, default=None, help="training tokens per epoch (10000000, 1e7, 10M)")
    data.add_argument(
        "--dataset-rows", type=count, default=None, help="rows per epoch, each seq-len tokens (50000, 5e4, 50k)"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row / sequence (default 512)")
    parser.add_argument("--epochs", type=float, default=3, help="default 3")
    parser.add_argument("--method", default="lora", choices=["full", "lora", "qlora", "dora"])
    parser.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated module names, 'all-linear' or a regex (default: query/value)",
    )
    parser.add_argument("--gpu", default="A100-80GB", help="GPU name from the table (default A100-80GB)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: the fewest that fit)")
    parser.add_argument(
        "--gpu-table", default=None, help="your own GPU table (JSON, same layout as the default)"
    )
    parser.add_argument(
        "--price-per-hour", type=float, default=None, help="override the GPU's hourly price (USD)"
    )
    parser.add_argument(
        "--mfu", type=float, default=None, help="model FLOPs utilisation in (0, 1] (default 0.35)"
    )
    parser.add_argument(
        "--benefit-per-month", type=float, default=0.0, help="expected benefit in USD per month"
    )
    parser.add_argument("--horizon-months", type=float, default=12.0, help="ROI horizon (default 12)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU per step (default 4)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    parser.add_argument("--no-grad-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--optimizer", default="adamw", choices=list(OPTIMIZERS), help="what lorakit train runs (AdamW)"
    )
    parser.add_argument(
        "--distributed",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="how --gpus > 1 train: ddp (what lorakit train runs: every GPU holds the whole model, so "
        "memory per GPU does not shrink); fsdp is refused until sharded training exists",
    )
    parser.add_argument(
        "--adapters-per-base",
        type=int,
        default=1,
        help="unmerged adapters sharing one served base (default 1: merged)",
    )
    parser.add_argument("--task-complexity", default="moderate", choices=["simple", "moderate", "complex"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--report", default=None, metavar="DIR", help="write plan.md, plan_chart.png, plan.json"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine: predicted vs measured peak memory and step time (llama-15m)",
    )
    parser.add_argument(
        "--calibrate-steps", type=int, default=3, help="timed steps for --calibrate (default 3)"
    )


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        from lorakit.bench.calibrate import calibrate

        print(calibrate(steps=args.calibrate_steps).table())
        return 0
    from lorakit.bench.arch import PlanError
    from lorakit.bench.plan import plan
    from lorakit.bench.plan_report import table, to_json, write_report
    from lorakit.cli.common import parse_targets

    if args.model is None:
        raise PlanError("--model is required (a model directory, a builtin name or a size like 7B)")
    targets = parse_targets(args.targets)
    p = plan(
        args.model,
        tokens=args.tokens,
        dataset_rows=args.dataset_rows,
        seq_len=args.seq_len,
        epochs=args.epochs,
        method=args.method,
        r=args.r,
        targets=targets,
        gpu=args.gpu,
        gpus=args.gpus,
        price_per_hour=args.price_per_hour,
        mfu=args.mfu,
        benefit_per_month=args.benefit_per_month,
        horizon_months=args.horizon_months,
        micro_batch=args.micro_batch,
        precision=args.precision,
        grad_checkpointing=not args.no_grad_checkpointing,
        attention=args.attention,
        optimizer=args.optimizer,
        distributed=args.distributed,
        adapters_per_base=args.adapters_per_base,
        task_complexity=args.task_complexity,
        gpu_table=args.gpu_table,
    )
    print(to_json(p) if args.json else table(p))
    if args.report:
        paths = write_report(p, args.report)
        print(f"\nreport: {paths['markdown']} (chart {paths['chart']}, json {paths['json']})")
    return 0
