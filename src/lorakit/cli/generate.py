"""``lorakit generate``: complete a prompt with a causal LM, with or without an adapter."""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--adapter", default=None, help="adapter directory to load (from lorakit train or PEFT)"
    )
    parser.add_argument("--prompt", required=True, help="the text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument(
        "--template",
        default="none",
        choices=["none", "alpaca", "chat"],
        help="wrap the prompt as training did: alpaca instruction prompt or the chat template",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from lorakit.models import build_model
    from lorakit.models.builtin import require_causal_lm
    from lorakit.models.generate import generate
    from lorakit.models.tokenizer import load_tokenizer

    require_causal_lm(args.model)
    model = build_model(args.model, task="causal-lm")
    if args.adapter:
        from lorakit.io import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.model)
    print(
        generate(
            model,
            tok,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.template,
            args.seed,
        )
    )
    return 0
