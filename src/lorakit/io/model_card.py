"""The model card (README.md) written beside every saved adapter, as PEFT does for the Hub.

YAML front matter the Hub reads (``base_model``, ``library_name: peft``, ``tags``), then what a reader needs:
the base model, the method and its settings, the data and metrics of the run that trained it (when the
trainer passes them), the lorakit version, and how to load it in lorakit, in PEFT and in llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CARD_NAME = "README.md"

# adapter_config.json fields worth a line on the card, in this order (the rest stays in the json)
_SHOWN = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
          "init_lora_weights", "modules_to_save", "init_r", "target_r", "rank_pattern")


# PEFT task type -> (transformers auto class, lorakit build_model task)
_AUTO = {"CAUSAL_LM": ("AutoModelForCausalLM", "causal-lm"),
         "SEQ_CLS": ("AutoModelForSequenceClassification", "classification")}


def _fmt(v: Any) -> str:
    return f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`"


def model_card(config: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> str:
    """README.md text for an adapter whose ``adapter_config.json`` is ``config``; ``run`` may carry
    ``data`` (path or name), ``steps`` and ``metrics`` (name -> value) of the training run."""
    from lorakit.version import __version__

    named = config.get("base_model_name_or_path")
    base = named or "<base model>"
    method = "DoRA" if config.get("use_dora") else {"ADALORA": "AdaLoRA"}.get(config.get("peft_type"), "LoRA")
    auto, task = _AUTO.get(config.get("task_type") or "", ("AutoModel", "base"))
    front = ["---", *([f"base_model: {json.dumps(named)}"] if named else []), "library_name: peft",
             "tags:", "- lorakit", f"- {method.lower()}", "---", ""]
    lines = [f"# {method} adapter for {base}", "",
             f"Trained and saved with lorakit {__version__}, in PEFT's file format "
             "(`adapter_config.json` + `adapter_model.safetensors`).", "", "## Adapter", ""]
    lines += [f"- {k}: {_fmt(config[k])}" for k in _SHOWN if config.get(k) not in (None, [], {})]
    run = dict(run or {})
    if run:
        lines += ["", "## Training run", ""]
        if run.get("data"):
            lines.append(f"- data: `{run['data']}`")
        if run.get("steps") is not None:
            lines.append(f"- steps: {run['steps']}")
        for name, value in (run.get("metrics") or {}).items():
            lines.append(f"- {name}: {value:.4g}" if isinstance(value, float) else f"- {name}: {value}")
    lines += [
        "", "## Load it", "", "lorakit:", "", "```python", "import lorakit as lk",
        f"model = lk.build_model({json.dumps(base)}, task={json.dumps(task)})",
        'lk.load_adapter(model, "path/to/this/directory")', "```",
        "", "PEFT:", "", "```python", "from peft import PeftModel", f"from transformers import {auto}",
        f"base = {auto}.from_pretrained({json.dumps(base)})",
        'model = PeftModel.from_pretrained(base, "path/to/this/directory")', "```", "",
        "llama.cpp: `lorakit export path/to/this/directory --format gguf -o adapter.gguf` (LoRA, rsLoRA, "
        "rank patterns and AdaLoRA, Llama-family bases; DoRA and fully trained modules only as a merged model: "
        "add `--merged`), then `llama-cli -m base.gguf --lora adapter.gguf`.", "",
    ]
    return "\n".join(front + lines)
