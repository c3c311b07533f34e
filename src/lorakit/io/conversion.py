"""Adapters whose init trains on a residual of the base weight (PiSSA, OLoRA), converted on save so the
file is right on the unchanged base, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
writes it.

In memory the layer computes W_res x + s B A x with W_res = W - s B0 A0 (A0, B0: the initial factors the
adapter keeps and subtracts, ``lorakit.adapters.lora_init``; the base weight itself stays W). On W the
same update is s (B A - B0 A0) = s [B | -B0] [A ; A0]: a LoRA of rank 2r. Its alpha is doubled
(alpha * sqrt(2) with rsLoRA) so the scale is unchanged, and ``rank_pattern`` / ``alpha_pattern``
likewise; the file says ``init_lora_weights: true``, so PEFT, vLLM-style consumers and lorakit load it as
a plain LoRA. Layers of the adapter without initial factors (an embedding, a conv) are padded with zero
rows / columns.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit import methods
from lorakit.adapters.lora_init import initial_factors
from lorakit.config import AdapterConfig
from lorakit.surgery.inject import adapted_layers

PREFIX = methods.PEFT_PREFIX
# PEFT key of a LoRA factor -> the dimension that is the rank
_RANK_DIM = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": 1, "lora_embedding_B": 1}


def needs_conversion(cfg: AdapterConfig) -> bool:
    """The adapter's init trains on a residual of the base weight (its registry ``Init.changes_base``)."""
    return methods.init_entry(cfg).changes_base


def converted_config(cfg: AdapterConfig) -> AdapterConfig:
    """The config of the rank-2r LoRA: r, alpha and the patterns scaled so every layer's scale is kept."""
    f = math.sqrt(2.0) if cfg.use_rslora else 2.0
    init_only = methods.init_entry(cfg).options  # options of the init, which the plain LoRA does not have
    return cfg.replace(
        method_options={k: v for k, v in cfg.method_options.items() if k not in init_only},
        r=2 * cfg.r,
        alpha=cfg.alpha * f,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: v * f for k, v in cfg.alpha_pattern.items()},
        init="default",
    )


@torch.no_grad()
def converted_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PEFT keys, on CPU) as the rank-2r LoRA on the unchanged base."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        init = initial_factors(adapter)
        for key, t in adapter.peft_state().items():
            if key not in _RANK_DIM:
                raise ValueError(f"layer {name!r}: cannot convert tensor {key!r} to a plain LoRA")
            dim = _RANK_DIM[key]
            if init is not None and key in ("lora_A.weight", "lora_B.weight"):
                other = init[0] if dim == 0 else -init[1]
            else:
                other = torch.zeros_like(t)
            state[f"{PREFIX}{name}.{key}"] = torch.cat([t.detach(), other.to(t)], dim=dim).cpu().contiguous()
    return state
