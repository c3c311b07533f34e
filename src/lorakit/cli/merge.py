"""``lorakit merge``: fold an adapter into its base model and write a plain Hugging Face model.

The output directory has ``save_pretrained``'s layout (config.json + model.safetensors, plus the base
directory's tokenizer files when it has them), loads with plain transformers, and is written
atomically. The task (causal-lm / classification / base) comes from the adapter's ``task_type`` unless
``--task`` is given; the number of labels from the saved classifier head unless ``--num-labels`` is.
"""

from __future__ import annotations

import argparse
import os
import shutil

from lorakit.cli.common import add_model_argument

_TOKENIZER_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--adapter", required=True, help="adapter directory (lorakit or PEFT format)")
    parser.add_argument(
        "--adapter-name",
        default="default",
        help="adapter to read when --adapter holds several in sub-folders (default: default)",
    )
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument(
        "--task",
        default=None,
        choices=["causal-lm", "classification", "base"],
        help="model head (default: from the adapter's task_type, else causal-lm)",
    )
    parser.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="classification labels (default: from the adapter's saved classifier head)",
    )


def _num_labels(tensors: dict, modules_to_save: tuple[str, ...]) -> int | None:
    """Rows of the saved head's last weight (e.g. ``classifier.weight`` or ``classifier.out_proj.weight``)."""
    from lorakit.io.peft_format import PREFIX

    for module in modules_to_save:
        rows = [
            t.shape[0]
            for k, t in tensors.items()
            if k.startswith(PREFIX) and f".{module}." in f".{k[len(PREFIX) :]}" and k.endswith(".weight")
        ]
        if rows:
            return int(rows[-1])
    return None


def run(args: argparse.Namespace) -> int:
    import lorakit as lk
    from lorakit.io import load_adapter, read_adapter
    from lorakit.io.atomic import atomic_directory
    from lorakit.io.peft_format import TASK_FROM_PEFT
    from lorakit.models.builtin import resolve_model_path
    from lorakit.surgery.merge import unload

    cfg, meta, tensors = read_adapter(args.adapter, args.adapter_name)
    task = args.task or TASK_FROM_PEFT.get(meta.get("task_type") or "", "causal-lm")
    num_labels = args.num_labels or _num_labels(tensors, cfg.modules_to_save) or 2
    model = lk.build_model(args.model, task=task, num_labels=num_labels)
    load_adapter(model, args.adapter, args.adapter_name)
    model = unload(model, merge=True)
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model, as transformers would load it
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"{type(model).__name__} has no save_pretrained; lorakit merge writes Hugging Face models"
        )
    base_dir = resolve_model_path(args.model)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if base_dir and os.path.isdir(base_dir):
            for name in sorted(os.listdir(base_dir)):
                if name.startswith("tokenizer") or name in _TOKENIZER_FILES:
                    shutil.copy2(os.path.join(base_dir, name), os.path.join(tmp, name))
    print(f"merged adapter {args.adapter} ({cfg.method}, {task}) into {args.model}; wrote {args.out}")
    return 0
