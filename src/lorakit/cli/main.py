"""The lorakit command line: a table of subcommands -> API functions (no logic here).

Each subcommand lives in ``lorakit/cli/<module>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``--help`` is fast.
Errors a user can fix (bad config, missing file, ...) print one line and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lorakit import __version__

# subcommand -> (module under lorakit.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "the main job: fine-tune a real pretrained model on a generated task, offline"),
    "compare": ("compare", "train/evaluate several configurations side by side: metric, params, time, memory, latency"),
    "inspect": ("inspect", "dry run: which modules an adapter config targets, and the efficiency table"),
    "merge": ("merge", "fold an adapter into its base model and write a plain Hugging Face model"),
    "export": ("export", "write an adapter (or the merged model) as a llama.cpp GGUF file"),
    "data-check": ("data_check", "check a data file: counts, empty/duplicate rows, labels, token lengths, truncation"),
    "plan": ("plan", "plan a fine-tune: memory per GPU, GPUs, time, cost, ROI and recommendations per method"),
    "train": ("train", "fine-tune an adapter from a YAML run config (resumable; torchrun for several processes)"),
    "generate": ("generate", "complete a prompt with a causal LM, with or without an adapter"),
    "serve": ("serve", "OpenAI-compatible server: one base model, many adapters batched together"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Parameter-efficient fine-tuning with LoRA and friends.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f"lorakit.cli.{module}").add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        return int(importlib.import_module(f"lorakit.cli.{args._module}").run(args) or 0)
    except KeyboardInterrupt as e:
        print(f"lorakit {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError, TypeError) as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
