"""``lorakit export ADAPTER_DIR --format gguf -o out.gguf``: a llama.cpp LoRA adapter GGUF, or with
``--merged`` the base with the adapter folded in as a full model GGUF (logic: ``lorakit.io.gguf_export``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter directory (lorakit or PEFT format)")
    parser.add_argument("--format", required=True, choices=["gguf"], help="output format (gguf: llama.cpp)")
    parser.add_argument("-o", "--out", required=True, help="output file")
    parser.add_argument(
        "--model", default=None,
        help="base model (builtin name or local directory; default: the adapter's base_model_name_or_path)",
    )
    parser.add_argument("--merged", action="store_true", help="write the merged full model, not the adapter")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"],
                        help="tensor type (default f32; norms stay f32 in a merged file)")
    parser.add_argument("--adapter-name", default="default",
                        help="adapter to read when the directory holds several in sub-folders")


def run(args: argparse.Namespace) -> int:
    from lorakit.io.gguf_export import export_gguf

    s = export_gguf(args.adapter, args.out, model=args.model, merged=args.merged,
                    adapter_name=args.adapter_name, out_type=args.outtype)
    what = f"merged {s['arch']} model, {s['tensors']} tensors, vocabulary: {s['vocab']}" if args.merged else (
        f"{s['arch']} LoRA adapter, {s['pairs']} pairs, alpha {s['alpha']:g}")
    print(f"wrote {args.out} ({what}, {s['outtype']}; base {s['base']})")
    return 0
