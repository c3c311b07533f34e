"""Mixed-adapter batches for serving: one base model, a different adapter (or the plain base) per row.

The routing itself lives with the adapters it routes (``lorakit.surgery.rows``, installed by ``inject`` and
``load_adapter``), so ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``
work on any model carrying lorakit adapters; the per-layer math (stacked, rank-padded factors and two
batched matmuls per layer, Punica/S-LoRA's gather form) is in ``lorakit.surgery.stacks``. This module adds
what a server needs on top: ``generate_rows`` (token ids in, new token ids out, one adapter per row) over
ragged token lists, and ``left_pad``. Not to be confused with ``lorakit.models.generate`` (text in, text
out, through a tokenizer, one adapter for all) or the ``lorakit generate`` command. ``generate`` is the old
name of ``generate_rows``, kept for one release; ``enable_adapter_names`` is kept for old callers; it is no
longer needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.surgery.rows import BASE, MixedBatchError, RowPlan, adapter_rows, install_row_routing
from lorakit.surgery.stacks import layer_stacks

__all__ = [
    "BASE",
    "MixedBatchError",
    "RowPlan",
    "adapter_rows",
    "enable_adapter_names",
    "generate",
    "generate_rows",
    "layer_stacks",
    "left_pad",
    "mixed_forward",
]


def mixed_forward(model: nn.Module, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with one adapter per row (see ``adapter_rows``)."""
    with adapter_rows(model, adapter_names):
        return model(*args, **kwargs)


def enable_adapter_names(model: nn.Module) -> nn.Module:
    """Kept for compatibility: ``inject``/``load_adapter`` already let ``model(..., adapter_names=[...])``
    and ``model.generate(..., adapter_names=[...])`` take one adapter name per row. Returns the model."""
    install_row_routing(model)
    return model


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, both (batch, longest)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MixedBatchError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_rows(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    adapter_names: Sequence[str],
    max_new_tokens: int = 32,
    pad_token_id: int | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """Greedy (by default) generation with one adapter per prompt, through HF ``model.generate`` with its
    KV cache; the routing applies at every decode step. Ragged token lists are left-padded. Returns the
    new tokens of each row (after the first EOS nothing more; the EOS itself is kept)."""
    cfg = getattr(model, "config", None)
    eos = generate_kwargs.pop("eos_token_id", getattr(cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids, mask = prompts.to(device), torch.ones_like(prompts, device=device)
    else:
        ids, mask = left_pad(prompts, pad_token_id, device)
    generate_kwargs.setdefault("do_sample", False)
    with adapter_rows(model, adapter_names), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos,
            **generate_kwargs,
        )
    new = out[:, ids.shape[1] :].tolist()
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    result = []
    for row in new:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        result.append(row[:cut])
    return result


generate = generate_rows
"""Old name of :func:`generate_rows`, kept for one release."""
