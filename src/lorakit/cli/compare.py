"""``lorakit compare``: train/evaluate several configurations, each in its own process; table + JSON + charts."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.methods import setups

    parser.add_argument("configs", nargs="+", help="run config YAML files (with --methods: exactly one base config)")
    parser.add_argument("--methods", default=None,
                        help=f"derive configs from one base config: comma-separated of {','.join(setups())}; "
                             "each trains with training.lr=auto (its method's rate) unless --set training.lr=...")
    parser.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in every configuration, e.g. training.max_steps=50")


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.common import split_csv
    from lorakit.recipes.compare import derive_configs, lr_is_set, markdown_table, run_compare
    from lorakit.train.config import load_run_config

    loaded = {os.path.splitext(os.path.basename(p))[0]: load_run_config(p, args.overrides).to_dict()
              for p in args.configs}
    if args.methods:
        if len(loaded) != 1:
            raise ValueError("--methods derives configurations from exactly one base config")
        lr = None if lr_is_set(None, args.overrides) else "auto"  # each method its own rate unless --set
        configs = derive_configs(next(iter(loaded.values())), split_csv(args.methods) or [], lr)
    else:
        configs = loaded
        for path, cfg in zip(args.configs, loaded.values()):
            if not lr_is_set(path, args.overrides):
                cfg["training"]["lr"] = "auto"
    rows = run_compare(configs, args.out)
    print()
    print(markdown_table(rows))
    print(f"written: {args.out}/compare.md, compare.json, compare_metric.png, compare_latency.png, compare_memory.png")
    return 0
