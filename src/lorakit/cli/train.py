"""``lorakit train CONFIG.yaml``: fine-tune an adapter from one YAML run config (``lorakit.train.train``).

Under ``torchrun --nproc_per_node=N -m lorakit train CONFIG.yaml`` every process runs this command and
trains with DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="YAML run config (sections model, data, adapter, quant, training, output)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set training.lr=1e-4; repeatable",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output.dir"
    )
    group.add_argument("--overwrite", action="store_true", help="replace a previous run in output.dir")


def run(args: argparse.Namespace) -> int:
    from lorakit.train.trainer import train

    train(args.config, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)
    return 0
