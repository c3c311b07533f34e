"""Merge, unmerge, unload and combine adapters: each a walk over the model's adapted layers.

Merging folds the active adapter's dense update into the base weights, W' = W + delta_weight (LoRA:
W + (alpha/r) B A, Hu et al. 2021, https://arxiv.org/abs/2106.09685, section 4.1: "no additional
inference latency"), explicitly and checked: a non-finite result or a second merge is refused, and a
failure part-way undoes the layers already merged (STYLE.md rule 3). ``unload`` then swaps every
lorakit wrapper for the plain module it wraps, so the model is of its original classes again.

``combine_adapters`` builds a new LoRA adapter from weighted existing ones:

- ``how="cat"``: per layer, A = [w_1 s_1 A_1; ...; w_n s_n A_n] (stacked along the rank) and
  B = [B_1, ..., B_n], with scaling 1, so B A = sum_i w_i s_i B_i A_i exactly -- rank = sum of ranks;
- ``how="linear"``: (PEFT's ``add_weighted_adapter(..., "linear")``) A = sum_i sign_i sqrt(|w_i s_i|) A_i,
  B = sum_i sqrt(|w_i s_i|) B_i, scaling 1 -- same rank, only an approximation of the weighted sum
  (it adds cross terms B_i A_j); all adapters must have the same rank in each layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.config import AdapterConfig, ConfigError
from lorakit.state import peek_state, set_state
from lorakit.surgery.inject import (
    active_adapter,
    adapted_layers,
    adapter_configs,
    check_adapter_name,
    delete_adapter,
    inject,
    replace_module,
    set_adapter,
    trained_copies,
)
from lorakit.surgery.layer import AdapterStateError
from lorakit.surgery.rows import remove_row_routing

# PEFT names of the two LoRA factors: (A, B); A is stacked along dim 0, B along dim 1.
_FACTORS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in adapted_layers(model))


def merge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold the active adapter (or ``adapter_name``, which becomes active) into the base weights.

    Refuses to merge when an adapter is already merged, and when any layer's merged weight would not
    be finite; a failure in one layer undoes the layers merged before it. Returns the model.
    """
    if is_merged(model):
        merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged})
        raise AdapterStateError(f"adapter {merged[0]!r} is already merged; call lorakit.unmerge first")
    if adapter_name is not None:
        set_adapter(model, adapter_name)
    name = active_adapter(model)
    if name is None:
        raise AdapterStateError("the model has no active adapter to merge")
    layers = [(lname, layer) for lname, layer in adapted_layers(model) if name in layer.adapters]
    for lname, layer in layers:  # check every layer before changing any, so a refusal changes nothing
        _check_finite(lname, layer, name)
    done = []
    try:
        for _, layer in layers:
            layer.merge(name)
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    return model


@torch.no_grad()
def _check_finite(lname: str, layer: nn.Module, name: str) -> None:
    """What ``AdaptedLayer.merge`` would write must be finite (computed and discarded)."""
    adapter, access = layer.adapters[name], layer.access
    w = access.dense_weight(torch.float32)
    merged = (
        adapter.merge_weight(access, w)
        if hasattr(adapter, "merge_weight")
        else w + adapter.delta_weight(access)
    )
    if not torch.isfinite(merged).all():
        raise AdapterStateError(
            f"layer {lname!r}: merging adapter {name!r} gives non-finite weights; nothing was changed"
        )


_merge_active = merge  # ``unload``'s ``merge`` flag shadows the function's name


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights a merge changed (W = W' - delta_weight; exact up to fp32 rounding)."""
    if not is_merged(model):
        raise AdapterStateError("no adapter is merged; nothing to unmerge")
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def unload(
    model: nn.Module, merge: bool = True, dequantize: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Remove every lorakit module and return the plain model (same object, original classes).

    With ``merge=True`` the active adapter is merged first (if none is merged yet) and each module in
    ``modules_to_save`` becomes the active adapter's trained copy: the result computes what the
    adapted model computed. With ``merge=False`` merged adapters are unmerged and the original modules
    come back: the result is the base model. Parameters keep their ``requires_grad`` flags.

    ``dequantize=True`` (QLoRA, the recommended way) first replaces every quantized base layer by a
    dense ``nn.Linear`` in ``dtype`` (default: the layer's compute dtype), so the adapter merges
    exactly into full-precision weights; merging into a 4-bit base instead re-quantizes (lossy, with a
    warning stating the measured error).
    """
    if dequantize:
        from lorakit.quant import dequantize_model, quantized_layers

        if not quantized_layers(model):
            raise ConfigError("unload(dequantize=True): the model has no lorakit quantized layers")
        if is_merged(model):
            raise AdapterStateError(
                "unload(dequantize=True): an adapter is already merged into the 4-bit weights (lossy); "
                "load the adapter onto a fresh quantized base and unload from there"
            )
        dequantize_model(model, dtype)
    if merge and not is_merged(model) and active_adapter(model) is not None:
        _merge_active(model)
    elif not merge and is_merged(model):
        unmerge(model)
    active = active_adapter(model)
    for name, layer in list(adapted_layers(model)):
        replace_module(model, name, layer.base)
    for name, tc in list(trained_copies(model)):
        keep = tc.copies[active] if merge and active in tc.copies else tc.original
        replace_module(model, name, keep)
    state = peek_state(model)
    if state is not None:
        state.clear_adapters()
        set_state(model, state)  # removed when nothing is left (a quantized base keeps its record)
    remove_row_routing(model)  # the hooks that read adapter_names go too: a plain model again
    return model


# ------------------------------------------------------------------------------------------ combine
def _factors(adapter: nn.Module, owner: str) -> tuple[str, str, torch.Tensor, torch.Tensor, float]:
    state = adapter.peft_state()
    for a_key, b_key in _FACTORS:
        if set(state) == {a_key, b_key}:
            return (
                a_key,
                b_key,
                state[a_key].detach().float(),
                state[b_key].detach().float(),
                float(adapter.scaling),
            )
    raise ConfigError(
        f"combine_adapters supports plain LoRA adapters only; {owner} holds tensors {sorted(state)}"
    )


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    how: str = "cat",
) -> nn.Module:
    """Add LoRA adapter ``new_name`` built from ``sum_i weights[i] * adapter names[i]`` (see the module
    docstring for "cat", exact, and "linear", PEFT's approximation). The new adapter covers the union
    of the layers; it is added inactive. Adapters with ``modules_to_save`` cannot be combined."""
    if how not in ("cat", "linear"):
        raise ConfigError(f"how={how!r} is not supported; expected 'cat' or 'linear'")
    names, weights = list(names), [float(w) for w in weights]
    if not names or len(names) != len(weights):
        raise ConfigError(
            f"combine_adapters: give one weight per adapter (got {len(names)} names, {len(weights)} weights)"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"combine_adapters: names {names} repeat an adapter")
    check_adapter_name(new_name)
    configs = adapter_configs(model)
    for n in names:
        if n not in configs:
            raise AdapterStateError(f"no adapter named {n!r}; the model has {list(configs)}")
        if configs[n].method != "lora":
            raise ConfigError(
                f"combine_adapters supports method='lora' only; adapter {n!r} is {configs[n].method!r}"
            )
        if configs[n].modules_to_save:
            raise ConfigError(
                f"combine_adapters: adapter {n!r} has modules_to_save {list(configs[n].modules_to_save)}; "
                "fully trained modules cannot be combined as low-rank updates"
            )
    if new_name in configs:
        raise AdapterStateError(
            f"adapter {new_name!r} is already in the model; delete it first or pick another name"
        )
    if is_merged(model):
        raise AdapterStateError("combine_adapters needs unmerged adapters; call lorakit.unmerge first")

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for lname, layer in adapted_layers(model):
        parts = [
            (w, _factors(layer.adapters[n], f"{lname!r} ({n!r})"))
            for n, w in zip(names, weights)
            if n in layer.adapters
        ]
        if not parts:
            continue
        a_key, b_key = parts[0][1][:2]
        if how == "cat":
            a = torch.cat([w * s * fa for w, (_, _, fa, _, s) in parts], dim=0)
            b = torch.cat([fb for _, (_, _, _, fb, _) in parts], dim=1)
        else:
            ranks = {fa.shape[0] for _, (_, _, fa, _, _) in parts}
            if len(ranks) != 1:
                raise ConfigError(
                    f"how='linear' needs equal ranks; layer {lname!r} has ranks {sorted(ranks)} "
                    "(use how='cat')"
                )
            a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * fa for w, (_, _, fa, _, s) in parts)
            b = sum(math.sqrt(abs(w * s)) * fb for w, (_, _, _, fb, s) in parts)
        tensors[lname] = {a_key: a, b_key: b}
    if not tensors:
        raise ConfigError(f"combine_adapters: adapters {names} adapt no layer of the model")

    ranks = {lname: t[next(iter(t))].shape[0] for lname, t in tensors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    odd = {re.escape(lname): rank for lname, rank in ranks.items() if rank != r}
    cfg = AdapterConfig(
        method="lora",
        r=r,
        alpha=float(r),
        target_modules=tuple(tensors),
        rank_pattern=odd,
        alpha_pattern={k: float(v) for k, v in odd.items()},
    )  # alpha = rank: scaling 1
    with torch.random.fork_rng(devices=[]):
        inject(model, cfg, new_name, activate=False)
    try:
        for lname, layer in adapted_layers(model):
            if new_name in layer.adapters:
                layer.adapters[new_name].load_peft_state(tensors[lname])
    except BaseException:
        delete_adapter(model, new_name)
        raise
    return model
