"""``lorakit serve``: an OpenAI-compatible server for one base model and many adapters (mixed batches)."""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_argument
from lorakit.serving.limits import Limits


def _adapter_pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=DIR, got {value!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--adapter",
        action="append",
        type=_adapter_pair,
        default=[],
        metavar="NAME=DIR",
        help="an adapter directory served as model NAME (repeatable)",
    )
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=None,
        help="most adapters kept in memory; others reload from disk on demand (LRU)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="most rows decoded together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather a batch")
    parser.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens limit")
    parser.add_argument("--served-name", default=None, help="model id of the base (default: --model)")
    bounds = Limits()  # the API's defaults, not repeated here
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=bounds.max_prompts,
        help=f"most prompts in one /v1/completions request (default {bounds.max_prompts}; more: 400)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=bounds.max_body_bytes,
        help=f"largest request body in bytes (default {bounds.max_body_bytes}; larger: 413)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=bounds.max_queue,
        help=f"most prompts waiting for the engine (default {bounds.max_queue}; more: 429 with Retry-After)",
    )
    parser.add_argument("--admin", action="store_true", help="enable POST/DELETE /v1/adapters")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lorakit.serving.server import build_app

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("--adapter: the same NAME is given twice")
    app = build_app(
        args.model,
        adapters,
        max_loaded=args.max_loaded,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_context=args.max_context,
        admin=args.admin,
        served_name=args.served_name,
        max_prompts=args.max_prompts,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
    )
    print(
        f"serving {args.served_name or args.model} + {len(adapters)} adapters on http://{args.host}:{args.port}"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
