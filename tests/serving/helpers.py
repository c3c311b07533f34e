"""Adapters written to disk for the serving tests (tiny-llama, different ranks, random non-zero weights)."""

from __future__ import annotations

import os

import torch

import lorakit
from lorakit.io import save_adapter


def write_adapters(root: str, names: list[str], model_name: str = "tiny-llama") -> dict[str, str]:
    """Save one adapter per name under ``root`` (r = 2, 3, 4, ...; rsLoRA on every other) -> name -> dir."""
    model = lorakit.build_model(model_name)
    gen = torch.Generator().manual_seed(123)
    dirs = {}
    for i, name in enumerate(names):
        cfg = lorakit.AdapterConfig(
            r=2 + i % 5, alpha=8, use_rslora=bool(i % 2), target_modules=["q_proj", "v_proj"]
        )
        lorakit.inject(model, cfg, name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        dirs[name] = save_adapter(model, os.path.join(root, name), name)
    return dirs
