"""``lorakit data-check``: counts, empty/duplicate rows, label balance, token lengths and truncation of a data file."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a .jsonl, .json, .csv or .tsv file")
    parser.add_argument("--task", default="sft", choices=["sft", "classification"], help="default: sft")
    parser.add_argument(
        "--model",
        default="tiny-llama",
        help="model whose tokenizer counts tokens: a local HF model directory or a builtin (default tiny-llama: bytes)",
    )
    parser.add_argument(
        "--max-length", type=int, default=512, help="training max length in tokens (default 512)"
    )
    parser.add_argument("--fields", default=None, help="field mapping, e.g. text=sentence,label=label")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "messages", "alpaca", "prompt_completion", "text"],
        help="SFT row format (default: detected from the first row)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from lorakit.train.check import check_dataset

    report = check_dataset(args.data, args.model, args.task, args.max_length, args.fields, args.format)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0
