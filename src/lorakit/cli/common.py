"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--model", default=default, required=default is None,
        help="a builtin (tiny-llama, tiny-gpt2, tiny-bert, llama-15m, minilm), a local Hugging Face model "
        "directory, or a hub id (from the local cache, else downloaded)",
    )


def split_csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit import methods

    parser.add_argument("--method", default="lora", choices=list(methods.names()),
                        help="adapter method, from the method registry (default lora)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names, 'all-linear', or a regex (default: query/value projections)")
    parser.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="scaling numerator (default 16)")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")


def parse_targets(value: str | None) -> str | list[str] | None:
    """--targets: None (the model's query/value projections), "all-linear", a regex (if it holds regex
    metacharacters) or a comma-separated list of module names."""
    if not value or value == "all-linear" or any(c in value for c in "*[(|\\$^"):
        return value or None
    return split_csv(value)


def adapter_config_from_args(args: argparse.Namespace):
    from lorakit.config import AdapterConfig

    return AdapterConfig(method=args.method, r=args.r, alpha=args.alpha, target_modules=parse_targets(args.targets),
                         use_rslora=args.rslora)
