"""Mixed-adapter batches: one base model, a different adapter (or the plain base) per row.

For each adapted layer the loaded LoRA adapters are stacked once (and cached until an adapter is added,
removed or its weights change)::

    A_stack: (S, k, R)   A_s^T, ranks zero-padded to the largest R
    B_stack: (S, R, d)   scaling_s * B_s^T (rsLoRA's alpha/sqrt(r) folded in the same way)

with one extra all-zero slot for the plain base. A batch with slot index ``idx[i]`` for row ``i`` then
computes the low-rank term of every row together, with a gather and two batched matmuls::

    y = base(x) + bmm(bmm(x, A_stack[idx]), B_stack[idx])      x: (b, s, k) -> (b, s, d)

instead of PEFT's Python loop over adapters (one sub-batch each). This is the gather form of Punica's
SGMV / S-LoRA (Chen et al. 2023, https://arxiv.org/abs/2310.18547; Sheng et al. 2023,
https://arxiv.org/abs/2311.03285). Zero padding is exact: padded rank columns contribute 0.

The stacks are detached copies: the mixed path is for inference (no gradients reach the adapters and
dropout is not applied, as in eval mode). DoRA/AdaLoRA/conv adapters and merged layers raise
``MixedBatchError`` when a batch asks for them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.adapters.lora import LoraEmbedding, LoraLinear
from lorakit.surgery.inject import RESERVED_NAMES, adapted_layers, adapter_configs, trained_copies
from lorakit.surgery.layer import AdaptedLayer

BASE = RESERVED_NAMES[0]  # the row name that selects the plain base model ("base")
_STACKS_ATTR = "_lorakit_mixed_stacks"


class MixedBatchError(ValueError):
    """A mixed-adapter batch cannot be run as asked (unknown name, unsupported adapter, merged layer)."""


def _supported(adapter: nn.Module) -> bool:
    # exact types: DoRA subclasses LoraLinear but rescales the output, which the stacks cannot express
    return type(adapter) in (LoraLinear, LoraEmbedding)


@dataclass
class _Stacks:
    key: tuple
    slots: dict[str, int]  # adapter name -> slot; slot len(slots) is the zero (base) slot
    a: torch.Tensor  # linear: (S, k, R); embedding: (S, V, R)
    b: torch.Tensor  # (S, R, d), scaling folded in
    embedding: bool


def _factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a LoRA adapter: (r, k) and (d, r) for linear; (r, V) and (d, r) for embedding."""
    if isinstance(adapter, LoraEmbedding):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def _stack_key(layer: AdaptedLayer, names: Sequence[str]) -> tuple:
    """Changes when an adapter is added/removed or its tensors are replaced or modified in place."""
    key = []
    for n in names:
        a, b = _factors(layer.adapters[n])
        key.append((n, a.data_ptr(), a._version, b.data_ptr(), b._version))
    return tuple(key)


@torch.no_grad()
def layer_stacks(layer: AdaptedLayer) -> _Stacks:
    """The (cached) stacked, rank-padded A and scaled B of the LoRA adapters ``layer`` holds."""
    names = [n for n, ad in layer.adapters.items() if _supported(ad)]
    key = _stack_key(layer, names)
    cached: _Stacks | None = getattr(layer, _STACKS_ATTR, None)
    if cached is not None and cached.key == key:
        return cached
    embedding = layer.access.kind == "embedding"
    adapters = [layer.adapters[n] for n in names]
    a_list = [_factors(ad)[0].t() for ad in adapters]  # (k, r), or (V, r) for an embedding
    b_list = [_factors(ad)[1].t() * ad.scaling for ad in adapters]  # (r, d)
    ref = next(iter(layer.adapters.values()))
    p0 = next(ref.parameters())
    k, d = layer.access.in_features, layer.access.out_features
    rank = max([t.shape[1] for t in a_list], default=1)
    a = torch.zeros(len(names) + 1, k, rank, dtype=p0.dtype, device=p0.device)
    b = torch.zeros(len(names) + 1, rank, d, dtype=p0.dtype, device=p0.device)
    for i, (ta, tb) in enumerate(zip(a_list, b_list)):
        a[i, :, : ta.shape[1]] = ta
        b[i, : tb.shape[0]] = tb
    stacks = _Stacks(key, {n: i for i, n in enumerate(names)}, a, b, embedding)
    setattr(layer, _STACKS_ATTR, stacks)
    return stacks


class RowPlan:
    """Which adapter each row of the batch uses; shared by every layer's router during a forward."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.version = 0  # bumped by select(), so routers rebuild their row index

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (generation dropping finished rows from the batch)."""
        self.names = [self.names[i] for i in rows]
        self.version += 1

    def rows(self, batch: int) -> list[str]:
        """Names for ``batch`` rows: generation may repeat each row (beams, num_return_sequences)."""
        n = len(self.names)
        if batch == n:
            return self.names
        if n and batch % n == 0:
            return [name for name in self.names for _ in range(batch // n)]
        raise MixedBatchError(f"the batch has {batch} rows but adapter_names has {n} names (one per row)")


class _Router:
    """``AdaptedLayer.row_routing`` for one layer: base(x) + the gathered low-rank term per row."""

    def __init__(self, layer: AdaptedLayer, stacks: _Stacks, plan: RowPlan) -> None:
        self.stacks, self.plan = stacks, plan
        self._idx: dict[tuple[int, int], torch.Tensor] = {}
        uniq = set(plan.names)
        # whole batch on one adapter (or all base): the plain single-adapter path, no gather
        self.single = next(iter(uniq)) if len(uniq) == 1 else None
        if self.single is not None and self.single != BASE and self.single not in layer.adapters:
            self.single = BASE  # this adapter does not touch this layer

    def index(self, batch: int) -> torch.Tensor:
        key = (self.plan.version, batch)
        idx = self._idx.get(key)
        if idx is None:
            zero = len(self.stacks.slots)
            slots = [self.stacks.slots.get(n, zero) for n in self.plan.rows(batch)]
            self._idx = {key: torch.tensor(slots, dtype=torch.long, device=self.stacks.a.device)}
            idx = self._idx[key]
        return idx

    def __call__(self, layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.single is not None:
            if self.single == BASE:
                return out
            return layer.adapters[self.single](x, out, layer.access)
        batch = x.shape[0]
        idx = self.index(batch)
        a = self.stacks.a.index_select(0, idx)  # (b, k, R) or (b, V, R)
        b = self.stacks.b.index_select(0, idx)  # (b, R, d)
        if self.stacks.embedding:
            ids = x.reshape(batch, -1)
            rows = torch.arange(batch, device=ids.device)[:, None]
            t = a[rows, ids]  # (b, s, R): row i reads its own table
        else:
            t = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a.dtype), a)  # (b, s, R)
        y = torch.bmm(t, b)  # (b, s, d)
        return out + y.view(out.shape).to(out.dtype)


def _check_rows(model: nn.Module, names: Sequence[str]) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise MixedBatchError(f"adapter_names must be a non-empty list with one name per row, got {names!r}")
    known = adapter_configs(model)
    for n in dict.fromkeys(names):
        if n == BASE or n in RESERVED_NAMES:
            continue
        if n not in known:
            raise MixedBatchError(
                f"adapter_names: no adapter named {n!r}; the model has {list(known)} (or {BASE!r})"
            )
    used = set(names) - {BASE}
    for lname, layer in adapted_layers(model):
        if layer.merged:
            raise MixedBatchError(
                f"layer {lname!r} has merged adapters {layer.merged}; unmerge before mixed batches"
            )
        for n in used & set(layer.adapters):
            if not _supported(layer.adapters[n]):
                raise MixedBatchError(
                    f"adapter {n!r} on layer {lname!r} is a {type(layer.adapters[n]).__name__}; mixed batches "
                    "support LoRA and rsLoRA on linear and embedding layers"
                )
    for tname, tc in trained_copies(model):
        hit = sorted(used & set(tc.copies))
        if hit:
            raise MixedBatchError(
                f"adapter {hit[0]!r} has a trained copy of {tname!r} (modules_to_save); mixed batches "
                "support adapters without modules_to_save"
            )


@contextmanager
def adapter_rows(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[RowPlan]:
    """Within the block, row ``i`` of every forward through ``model`` uses adapter ``adapter_names[i]``
    (``"base"`` for the plain base). A batch that is a multiple of ``len(adapter_names)`` repeats each
    name (generation with beams or several sequences per prompt). Yields the ``RowPlan``."""
    _check_rows(model, adapter_names)
    plan = RowPlan([BASE if n in RESERVED_NAMES else n for n in adapter_names])
    layers = [layer for _, layer in adapted_layers(model)]
    copies = [tc for _, tc in trained_copies(model)]
    previous = [layer.row_routing for layer in layers]
    copies_was = [tc.disabled for tc in copies]
    try:
        for layer in layers:
            layer.row_routing = _Router(layer, layer_stacks(layer), plan)
        for tc in copies:  # no row uses a trained copy (checked above): every row sees the original
            tc.disabled = True
        yield plan
    finally:
        for layer, was in zip(layers, previous):
            layer.row_routing = was
        for tc, was in zip(copies, copies_was):
            tc.disabled = was


def mixed_forward(model: nn.Module, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with one adapter per row (see ``adapter_rows``)."""
    with adapter_rows(model, adapter_names):
        return model(*args, **kwargs)


def enable_adapter_names(model: nn.Module) -> nn.Module:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` take one
    adapter name per row (in place; returns the model). Without ``adapter_names`` nothing changes."""
    if getattr(model, "_lorakit_adapter_names", False):
        return model
    forward = model.forward

    @functools.wraps(forward)
    def routed_forward(*args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return forward(*args, **kwargs)
        with adapter_rows(model, adapter_names):
            return forward(*args, **kwargs)

    model.forward = routed_forward
    if hasattr(model, "generate"):
        generate_fn = model.generate

        @functools.wraps(generate_fn)
        def routed_generate(*args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
            if adapter_names is None:
                return generate_fn(*args, **kwargs)
            with adapter_rows(model, adapter_names):
                return generate_fn(*args, **kwargs)

        model.generate = routed_generate
    model._lorakit_adapter_names = True
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


def generate(
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
