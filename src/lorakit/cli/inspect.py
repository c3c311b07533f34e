"""``lorakit inspect``: the dry run — targeted modules and the efficiency table, without training."""

from __future__ import annotations

import argparse

from lorakit.cli.common import adapter_config_from_args, add_adapter_arguments, add_model_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, default="tiny-llama")
    parser.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification"])
    add_adapter_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import lorakit as lk

    cfg = adapter_config_from_args(args)
    model = lk.build_model(args.model, task=args.task)
    targets = lk.find_targets(model, cfg)
    print(f"{len(targets)} modules would be adapted ({cfg.method}, r={cfg.r}, alpha={cfg.alpha}):")
    for name in targets:
        print(f"  {name}")
    print()
    print(lk.efficiency_report(lk.inject(model, cfg)).table())
    return 0
