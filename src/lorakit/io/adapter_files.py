"""Save and load adapters as PEFT-compatible directories (``adapter_config.json`` +
``adapter_model.safetensors``; key naming in ``lorakit.io.peft_format``).

Saving writes only the adapter's tensors and its trained copies of ``modules_to_save`` (no base
weight), into a temporary directory that atomically takes the target's place. Loading is
transactional: the files are read and checked, the adapter is injected through the method registry
and filled layer by layer with ``adapter.load_peft_state``; if anything fails (missing or unexpected
keys, a shape that does not fit, a corrupted file, ...) the half-built adapter is deleted and the model
is left exactly as it was. Every such error is an ``AdapterFileError`` on one line naming the file and
the field, tensor key or layer (a config field that is wrong is an ``AdapterConfigError``, also a
``ConfigError``). Nothing is unpickled: safetensors only, and a legacy ``adapter_model.bin``
only through ``torch.load(weights_only=True)``. A path that is not a local directory is an error, never
a hub lookup.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import AdapterConfig, ConfigError, show
from lorakit.io.atomic import atomic_directory
from lorakit.io.checks import check_dtype, check_ranks, first, target_filters
from lorakit.io.conversion import converted_config, converted_state, needs_conversion
from lorakit.io.errors import AdapterConfigError, AdapterFileError, AdapterNotFoundError
from lorakit.io.model_card import CARD_NAME, model_card
from lorakit.io.peft_format import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    PREFIX,
    WEIGHTS_NAME,
    config_from_peft,
    config_to_peft,
    task_type_of,
)
from lorakit.state import peek_state, set_state, state_of
from lorakit.surgery.inject import (
    active_adapter,
    adapted_layers,
    adapter_configs,
    check_adapter_name,
    delete_adapter,
    inject,
    set_adapter,
    trained_copies,
)
from lorakit.surgery.layer import AdapterStateError
from lorakit.surgery.rows import remove_row_routing
from lorakit.surgery.targets import TargetError, find_targets


def adapter_dir(path: str | os.PathLike, adapter_name: str = "default") -> str:
    """Where adapter ``adapter_name`` is read from: ``path/<name>`` for a non-default name when that
    sub-folder holds an adapter (PEFT's and ``save_adapter``'s layout), else ``path`` itself."""
    path = os.fspath(path)
    sub = os.path.join(path, adapter_name)
    if adapter_name != "default" and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    return path


# ------------------------------------------------------------------------------------------- saving
def adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under PEFT's keys (adapter layers + trained copies)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            for key, t in layer.adapters[adapter_name].peft_state().items():
                state[f"{PREFIX}{name}.{key}"] = t
    for name, tc in trained_copies(model):
        if adapter_name in tc.copies:
            for key, t in tc.copies[adapter_name].state_dict().items():
                state[f"{PREFIX}{name}.{key}"] = t
    return state


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    run: Mapping[str, Any] | None = None,
) -> str:
    """Write adapter ``adapter_name`` of ``model`` to ``path`` (``path/<name>`` for a non-default name)
    as ``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT and lorakit load, plus a model
    card ``README.md`` (``run``: the training run's ``data``, ``steps`` and ``metrics`` for it). Only adapter
    and ``modules_to_save`` tensors are written; the write is atomic. Returns the directory written.
    An adapter whose init changed the base weight (PiSSA, OLoRA) is written as the rank-2r LoRA that is
    right on the unchanged base (``lorakit.io.conversion``, PEFT's weight conversion).

    ``task_type`` / ``base_model_name_or_path`` default to what the adapter was loaded with, else the
    model class (e.g. ``LlamaForCausalLM`` -> "CAUSAL_LM") and ``model.config._name_or_path``.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterStateError(f"no adapter named {adapter_name!r} to save; the model has {list(configs)}")
    cfg = configs[adapter_name]
    state = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model, adapter_name).items()
    }
    if needs_conversion(cfg):  # PiSSA / OLoRA: written as a rank-2r LoRA right on the unchanged base
        state.update(converted_state(model, adapter_name))
        cfg = converted_config(cfg)
    if not state:
        raise AdapterStateError(f"adapter {adapter_name!r} has no tensors in the model (nothing to save)")
    meta = state_of(model).peft_meta.get(adapter_name, {})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = config_to_peft(
        cfg,
        model,
        adapter_name,
        task_type=task_type or meta.get("task_type") or task_type_of(model),
        base_model_name_or_path=base_model_name_or_path
        or meta.get("base_model_name_or_path")
        or name_or_path,
    )
    out = os.fspath(path) if adapter_name == "default" else os.path.join(os.fspath(path), adapter_name)
    with atomic_directory(out) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(model_card(config, run))
    return out


# ------------------------------------------------------------------------------------------ reading
def read_adapter(
    path: str | os.PathLike, adapter_name: str = "default"
) -> tuple[AdapterConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory without a model: (config, metadata, tensors by PEFT key)."""
    folder = adapter_dir(path, adapter_name)
    if not os.path.isdir(folder):
        raise AdapterNotFoundError(
            f"adapter directory {folder!r} does not exist (lorakit never downloads adapters)"
        )
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise AdapterNotFoundError(f"{folder}: no {CONFIG_NAME} (is this an adapter directory?)")
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int past the digit limit, deep nesting
        detail = show(str(e) or type(e).__name__, 120)
        raise AdapterFileError(f"{config_path}: not valid JSON ({detail})") from None
    try:
        cfg, meta = config_from_peft(data, config_path)
    except ConfigError as e:
        raise AdapterConfigError(str(e)) from None
    return cfg, meta, _read_tensors(folder)


def weights_path(folder: str) -> str:
    """The tensor file of an adapter directory: safetensors, else a legacy ``adapter_model.bin``."""
    st_path = os.path.join(folder, WEIGHTS_NAME)
    legacy = os.path.join(folder, LEGACY_WEIGHTS_NAME)
    return legacy if not os.path.isfile(st_path) and os.path.isfile(legacy) else st_path


def _read_tensors(folder: str) -> dict[str, torch.Tensor]:
    st_path, bin_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            tensors = load_file(st_path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            detail = " ".join(str(e).split()) or type(e).__name__
            raise AdapterFileError(
                f"{st_path}: not a readable safetensors file ({show(detail, 160)})"
            ) from None
        source = st_path
    elif os.path.isfile(bin_path):
        warnings.warn(
            f"{bin_path}: legacy pickle format, read with torch.load(weights_only=True); "
            "re-save it with lorakit.save_adapter to get safetensors",
            stacklevel=3,
        )
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFileError(f"{bin_path}: cannot be read safely as tensors ({e})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterFileError(f"{bin_path}: expected a mapping of tensor names to tensors")
        source = bin_path
    else:
        raise AdapterNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})")
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(
                f"{source}: key {show(key)} does not start with {PREFIX!r} (not a PEFT adapter file)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(f"{source}: tensor {show(key)} holds NaN or infinite values")
    return tensors


# ------------------------------------------------------------------------------------------ loading
def _module_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules()}


def _fit_modules_to_save(
    cfg: AdapterConfig, model: nn.Module, tensors: dict[str, torch.Tensor]
) -> AdapterConfig:
    """PEFT adds "classifier" and "score" to modules_to_save of every SEQ_CLS adapter; keep the names
    that exist in the model or have tensors in the file (the rest would be an error for nothing)."""
    names = _module_names(model)
    keys = [k[len(PREFIX) :] for k in tensors]
    kept = tuple(
        m
        for m in cfg.modules_to_save
        if any(n == m or n.endswith("." + m) for n in names) or any(k.startswith(m + ".") for k in keys)
    )
    return cfg if kept == cfg.modules_to_save else cfg.replace(modules_to_save=kept)


def _fill(
    model: nn.Module,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    source: str,
    snapshot: _Snapshot,
    layer_kwargs: dict[str, dict[str, Any]],
) -> None:
    """Check the file's keys against the injected adapter, then load them layer by layer.

    Adapter tensors go through ``adapter.load_peft_state(state, **layer_kwargs.get(path, {}))``, which
    checks their shapes (an AdaLoRA adapter accepts fewer ranks than it was built with); its error is
    re-raised naming the file and the layer. PEFT also stores the full base weight of an adapted
    embedding/output layer (``<path>.base_layer.weight``, written when the vocabulary may have been
    resized); such tensors are loaded into the base module (saved first in ``snapshot``)."""
    adapters: list[tuple[str, nn.Module, list[str]]] = []
    fixed: dict[str, torch.Tensor] = {}  # trained copies and base weights: shapes must match exactly
    copies: list[tuple[str, nn.Module, list[str]]] = []
    base_params: dict[str, torch.Tensor] = {}
    dims: dict[str, int] = {}  # adapter tensors: the adapter checks their sizes, we their dimensions
    for name, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            own = layer.adapters[adapter_name].peft_state()
            adapters.append((name, layer.adapters[adapter_name], list(own)))
            dims.update({f"{PREFIX}{name}.{k}": t.dim() for k, t in own.items()})
            base_params.update(
                {f"{PREFIX}{name}.base_layer.{k}": t for k, t in layer.base.state_dict().items()}
            )
    for name, tc in trained_copies(model):
        if adapter_name in tc.copies:
            own = tc.copies[adapter_name].state_dict()
            copies.append((name, tc.copies[adapter_name], list(own)))
            fixed.update({f"{PREFIX}{name}.{k}": t for k, t in own.items()})
    expected = [f"{PREFIX}{name}.{key}" for name, _, keys in adapters + copies for key in keys]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in set(expected) and k not in base_params]
    if missing:
        raise AdapterFileError(
            f"{source}: {len(missing)} tensors the model's adapter needs are missing: "
            f"{first(missing)} (adapter saved for another model or config?)"
        )
    if unexpected:
        raise AdapterFileError(
            f"{source}: {len(unexpected)} unexpected tensors match no adapted module: "
            f"{first(unexpected)} (adapter saved for another model or config?)"
        )
    fixed.update({k: t for k, t in base_params.items() if k in tensors})
    for key, t in tensors.items():
        check_dtype(source, key, t, fixed.get(key))
        if key in dims and t.dim() != dims[key]:
            raise AdapterFileError(
                f"{source}: tensor {show(key)} has shape {tuple(t.shape)}; the adapter needs "
                f"{dims[key]} dimensions"
            )
    for key, t in fixed.items():
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise AdapterFileError(
                f"{source}: {key[len(PREFIX) :]!r} has shape {tuple(tensors[key].shape)} in the file but the "
                f"model needs {tuple(t.shape)} (adapter saved for another base model?)"
            )
    for name, module, keys in adapters:
        state = {key: tensors[f"{PREFIX}{name}.{key}"] for key in keys}
        try:
            module.load_peft_state(state, **layer_kwargs.get(name, {}))
        except (ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise AdapterFileError(
                f"{source}: layer {name!r}: {msg} (adapter saved for another base model or config?)"
            ) from None
    for name, module, keys in copies:
        module.load_state_dict({key: tensors[f"{PREFIX}{name}.{key}"] for key in keys})
    with torch.no_grad():
        for key, t in base_params.items():
            if key in tensors:
                snapshot.weights.append((t, t.detach().clone()))
                t.copy_(tensors[key].to(t.dtype))


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", activate: bool = True
) -> nn.Module:
    """Inject adapter ``adapter_name`` into ``model`` (in place) from a directory written by lorakit or
    PEFT, and return the model. Transactional: on any error the model is left as it was.

    Args:
        model: a plain base model (or one already holding other adapters).
        path: the adapter directory (``path/<adapter_name>`` is also tried for a non-default name).
        adapter_name: the name the adapter gets in the model (letters, digits, '_' or '-').
        activate: make it the active adapter (the first adapter of a model always is).
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise AdapterStateError(
            f"adapter {adapter_name!r} is already in the model; delete it first or pick another name"
        )
    cfg, meta, tensors = read_adapter(path, adapter_name)
    folder = adapter_dir(path, adapter_name)
    config_path, source = os.path.join(folder, CONFIG_NAME), weights_path(folder)
    cfg = _fit_modules_to_save(cfg, model, tensors)
    layer_kwargs = meta.pop("layer_kwargs", {})
    try:
        # names what the config wanted, before any change; a target entry that matches nothing only
        # warns, as PEFT accepts such files
        targets = find_targets(model, cfg, strict=False)
    except TargetError as e:
        raise AdapterConfigError(f"{config_path}: {e}{target_filters(cfg)}") from None
    check_ranks(cfg, targets, tensors, layer_kwargs, config_path, source)
    snapshot = _Snapshot(model)
    try:
        try:
            with torch.random.fork_rng(devices=[]):  # initialising the adapter must not move the user's RNG
                with warnings.catch_warnings():  # warned once above
                    warnings.simplefilter("ignore")
                    inject(model, cfg, adapter_name, activate=activate, strict_targets=False)
        except (ConfigError, TargetError) as e:  # the file's config does not fit this model
            raise AdapterConfigError(f"{config_path}: {e}") from None
        _fill(model, adapter_name, tensors, source, snapshot, layer_kwargs)
    except BaseException:
        snapshot.restore(adapter_name)
        raise
    state = state_of(model)
    state.peft_meta = {**state.peft_meta, adapter_name: meta}
    return model


class _Snapshot:
    """What injecting may change, so a failed load can put it back: a copy of the model's adapter state
    (``lorakit.state``: configs, active adapter, file metadata, controllers), the active adapter, every parameter's requires_grad, the
    row routing ``inject`` installs on a plain model (hooks and ``generate``). (No base weight: no init
    rewrites one; PiSSA / OLoRA subtract their initial product inside the adapter.)"""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        state = peek_state(model)
        self.state = state.copy() if state is not None else None
        self.hooks = self._hook_keys()
        self.active = active_adapter(model)
        self.grads = [(p, p.requires_grad) for p in model.parameters()]

    @torch.no_grad()
    def restore(self, adapter_name: str) -> None:
        if adapter_name in adapter_configs(self.model):
            delete_adapter(self.model, adapter_name)
        if self.active is not None:
            set_adapter(self.model, self.active)
        set_state(self.model, self.state)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        if self._hook_keys() != self.hooks:  # inject installed the row routing on a model without it
            remove_row_routing(self.model)

    def _hook_keys(self) -> tuple[list[int], list[int]]:
        return list(self.model._forward_pre_hooks), list(self.model._forward_hooks)


__all__ = [
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterNotFoundError",
    "adapter_state",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]
