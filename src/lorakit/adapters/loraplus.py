"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns ``loraplus_lr_ratio`` times
faster than A, an optimizer setting of lora and dora (``method_options``)::

    AdapterConfig(method_options={"loraplus_lr_ratio": 16})   # YAML: adapter.method_options

The parameter groups are PEFT's ``create_loraplus_optimizer`` (peft 0.21): each trainable parameter goes
to one of

- A: lora_A and any other matrix (a trained head's weight), at ``lr``, with weight decay;
- embedding: both factors of a LoRA on an embedding, at ``loraplus_lr_embedding`` (1e-6), with decay;
- B: lora_B and every vector (DoRA's magnitude, biases), at ``lr * ratio``, with weight decay unless the
  parameter's name holds "bias" or it sits in an ``nn.LayerNorm`` (then decay 0).

PEFT applies one weight decay (its ``loraplus_weight_decay``) to A, embedding and B; here that is
``training.weight_decay``. Empty groups are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from lorakit.adapters.base import named_param_groups
from lorakit.config import ConfigError
from lorakit.methods import Option
from lorakit.validation import check_number

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig


def _positive(field_name: str, value: Any) -> None:
    if value is not None:
        check_number(field_name, value, lambda v: v > 0, "a positive number (e.g. 16), or null for off")


LORAPLUS_OPTIONS = {
    "loraplus_lr_ratio": Option(None, _positive, "LoRA+: B's learning rate / A's (PEFT suggests >= 1, e.g. 16)"),
    "loraplus_lr_embedding": Option(1e-6, _positive, "LoRA+: learning rate of LoRA on embeddings"),
}


def validate_loraplus(cfg: AdapterConfig) -> None:
    """An embedding learning rate without a ratio would be ignored: refuse it."""
    if "loraplus_lr_embedding" in cfg.method_options and cfg.option("loraplus_lr_ratio") is None:
        raise ConfigError(
            "method_options.loraplus_lr_embedding is set but loraplus_lr_ratio is not (LoRA+ is off); "
            "set loraplus_lr_ratio (e.g. 16) or drop it"
        )


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters PEFT keeps out of weight decay in group B: inside an nn.LayerNorm, or named "bias"."""
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            out.update(f"{mname}.{n}" if mname else n for n, _ in module.named_parameters())
    out.update(n for n, _ in model.named_parameters() if "bias" in n)
    return out


def loraplus_groups(
    model: nn.Module, cfg: AdapterConfig, lr: float, weight_decay: float
) -> list[dict[str, Any]] | None:
    """The LoRA+ parameter groups of ``model`` (see the module docstring), or None when
    ``cfg.method_options`` sets no ``loraplus_lr_ratio``. Each group carries a ``name``."""
    ratio = cfg.option("loraplus_lr_ratio")
    if ratio is None:
        return None
    no_decay = _no_decay_names(model)
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_embedding_" in f".{name}":
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (float(cfg.option("loraplus_lr_embedding")), weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return named_param_groups("loraplus", groups, settings)
