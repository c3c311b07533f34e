"""Checks of an adapter file against its config and the model, made before or while loading: tensor
dtypes, and (before anything is injected) the rank of every targeted module, so that a wrong value in
``adapter_config.json`` is a clear error rather than an allocation of the wrong size."""

from __future__ import annotations

from typing import Any

import torch

from lorakit import methods
from lorakit.config import AdapterConfig, show
from lorakit.io.errors import AdapterConfigError, AdapterFileError
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME


def first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def check_dtype(source: str, key: str, t: torch.Tensor, model_tensor: torch.Tensor | None) -> None:
    """Adapter weights are floating point (any float dtype is cast, as PEFT does); a trained copy's or
    base tensor has the model's kind (an integer buffer stays that integer type)."""
    if model_tensor is None or model_tensor.is_floating_point():
        if not t.is_floating_point():
            raise AdapterFileError(
                f"{source}: tensor {show(key)} has dtype {t.dtype}; expected a floating-point tensor"
            )
    elif t.dtype != model_tensor.dtype:
        raise AdapterFileError(
            f"{source}: tensor {show(key)} has dtype {t.dtype}; the model's is {model_tensor.dtype}"
        )


def target_filters(cfg: AdapterConfig) -> str:
    """The config fields besides target_modules that narrowed the targets, for a "matched nothing" error."""
    fields = {
        "layers_to_transform": list(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None,
        "layers_pattern": cfg.layers_pattern,
        "exclude_modules": cfg.exclude_modules,
        "modules_to_save": list(cfg.modules_to_save) or None,
    }
    given = [f"{k}={show(v, 40)}" for k, v in fields.items() if v is not None]
    return f" (with {', '.join(given)})" if given else ""


def check_ranks(
    cfg: AdapterConfig,
    targets: list[str],
    tensors: dict[str, torch.Tensor],
    layer_kwargs: dict[str, dict[str, Any]],
    config_path: str,
    source: str,
) -> None:
    """Before anything is injected: every module the config targets has its tensors in the file, at the
    rank the config gives it (the method codec's ``stored_rank``: ``r`` / ``rank_pattern``; AdaLoRA: the
    kept ranks of its mask, else ``init_r``), and per-layer entries (AdaLoRA's masks) name only targeted
    modules. Injecting builds each adapter at the config's rank first, so without this a wrong ``r``
    (10**12, say) would try to allocate it."""
    codec = methods.get(cfg.method).peft
    keys = codec.rank_keys if codec is not None else ()
    if not keys:  # the method names no rank tensor: its load_peft_state checks the shapes
        return
    stray = sorted(set(layer_kwargs) - set(targets))
    if stray:
        raise AdapterConfigError(
            f"{config_path}: {codec.layer_field or 'the per-layer entries'} names {first(stray)}, which the "
            "config does not adapt (target_modules / layers_to_transform / exclude_modules / modules_to_save)"
        )
    for name in targets:
        found = [f"{PREFIX}{name}.{k}" for k in keys if f"{PREFIX}{name}.{k}" in tensors]
        if not found:
            raise AdapterFileError(
                f"{source}: no {show(f'{PREFIX}{name}.{keys[0]}')} for module {name!r}, which {CONFIG_NAME} "
                "targets (target_modules / layers_to_transform / exclude_modules / modules_to_save; adapter "
                "saved for another model or config?)"
            )
        t = tensors[found[0]]
        stored = int(t.shape[0]) if t.dim() >= 1 else None
        want, why = codec.stored_rank(cfg, name, layer_kwargs.get(name, {}))
        if stored != want:
            raise AdapterConfigError(
                f"{config_path}: module {name!r} has rank {want} ({why}) but {found[0]!r} in {WEIGHTS_NAME} "
                f"holds {stored if stored is not None else 'a scalar'}"
            )
