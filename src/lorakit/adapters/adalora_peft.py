"""AdaLoRA's PEFT file format (peft_type "ADALORA"): its adapter_config.json fields and kept-rank masks.

PEFT saves an AdaLoRA adapter with only the kept ranks of each matrix, and its ``rank_pattern`` is not a
rank override (as in LoRA) but a mask per ``"<module path>.lora_E"`` over the init_r singular values (True =
kept). The masks reach each adapter through ``load_peft_state(state, rank_mask=...)`` (``layer_kwargs``),
and a file's ranks are checked against them before anything is built (``file_rank``). Field names and
defaults follow peft 0.21's AdaLoraConfig.

The schedule is written in steps (PEFT's ints) once the run's length is known, which training fixes.
An adapter saved before that still holds lorakit's fractions (floats in (0, 1)) and a placeholder
``total_step`` of 1, which PEFT needs to load it (it reads the schedule only when it trains); reading such a
file back gives the fractions and no total_step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from lorakit.config import AdapterConfig, ConfigError, show
from lorakit.methods import PEFT_PREFIX, PeftCodec, json_field


def adalora_rank_masks(masks: Mapping[str, Any]) -> dict[str, list[bool]]:
    """PEFT's AdaLoRA ``rank_pattern`` (``"<module>.lora_E"`` -> kept-rank booleans over init_r) keyed by
    module path. The saved tensors hold only the kept ranks (PEFT slices them on save)."""
    out: dict[str, list[bool]] = {}
    for key, mask in masks.items():
        if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
            raise ConfigError(
                f"rank_pattern[{show(key)}] must be a list of booleans (AdaLoRA's kept-rank mask)"
            )
        module = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        out[re.sub(r"\.lora_E(\.[^.]+)?$", "", module)] = mask
    return out


def _from_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    if json_field(d, "use_dora", bool, False):
        raise ConfigError("use_dora=true cannot be combined with peft_type='ADALORA'")
    if json_field(d, "use_rslora", bool, False):
        raise ConfigError("use_rslora=true cannot be combined with peft_type='ADALORA'")
    target_r, init_r = json_field(d, "target_r", int, 8), json_field(d, "init_r", int, 12)
    schedule = {
        "tinit": json_field(d, "tinit", (int, float), 0),
        "tfinal": json_field(d, "tfinal", (int, float), 0),
        "delta_t": json_field(d, "deltaT", (int, float), 1),
    }
    fractions = any(isinstance(v, float) for v in schedule.values())
    for key, mask in adalora_rank_masks(json_field(d, "rank_pattern", dict, {})).items():
        if len(mask) != init_r:
            raise ConfigError(f"rank_pattern[{key!r}] has {len(mask)} entries; expected init_r={init_r}")
    # rank_pattern is AdaLoRA's kept-rank masks, not a rank override: it reaches the adapter through
    # load_peft_state(rank_mask=...) (see _layer_kwargs), not through the config.
    return dict(
        r=target_r,
        init_r=init_r,
        target_r=target_r,
        **schedule,
        beta1=json_field(d, "beta1", (int, float), 0.85),
        beta2=json_field(d, "beta2", (int, float), 0.85),
        orth_reg_weight=json_field(d, "orth_reg_weight", (int, float), 0.5),
        total_step=None if fractions else json_field(d, "total_step", int),
    )


def _to_peft(cfg: AdapterConfig, adapters: Mapping[str, nn.Module]) -> dict[str, Any]:
    # PEFT's rank_pattern for AdaLoRA is a kept-rank mask over init_r per "<module>.lora_E"; only the
    # count matters on load (the tensors are saved with the kept ranks).
    masks = {}
    for name, adapter in adapters.items():
        mask = getattr(adapter, "rank_mask", None)
        if mask is not None:
            masks[f"{name}.lora_E"] = [bool(b) for b in mask.tolist()]
        else:
            kept = int(getattr(adapter, "r", cfg.init_r))
            masks[f"{name}.lora_E"] = [True] * kept + [False] * (cfg.init_r - kept)
    if all(all(m) for m in masks.values()):
        masks = {}  # nothing pruned: PEFT's rank_pattern stays null
    if cfg.total_step is not None:
        total = cfg.total_step
    elif any(isinstance(v, float) for v in (cfg.tinit, cfg.tfinal, cfg.delta_t)):
        total = 1  # a placeholder PEFT needs (> 0); the fractions say the schedule is not resolved yet
    else:
        total = cfg.tinit + cfg.tfinal + 1  # PEFT needs total_step > tinit + tfinal
    return dict(
        rank_pattern=masks or None,
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=total,
    )


def _layer_kwargs(d: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    masks = adalora_rank_masks(d.get("rank_pattern") or {})
    return {path: {"rank_mask": mask} for path, mask in masks.items()}


def _file_rank(cfg: AdapterConfig, path: str, kwargs: Mapping[str, Any]) -> tuple[int, str]:
    mask = kwargs.get("rank_mask")
    if mask is not None:
        return sum(bool(b) for b in mask), "the kept ranks of its rank_pattern mask"
    return cfg.init_r, "init_r, as there is no rank_pattern mask"


ADALORA_PEFT = PeftCodec(
    "ADALORA",
    _to_peft,
    _from_peft,
    json_names={"r": "target_r", "delta_t": "deltaT"},
    rank_keys=("lora_A",),
    file_rank=_file_rank,
    layer_kwargs=_layer_kwargs,
    layer_field="rank_pattern",
)
