"""Injection and adapter management: add adapters to a model in place, switch, disable, delete.

Each function is a walk over the model's adapted layers (``AdaptedLayer``) and trained copies
(``TrainedCopy``). The configs of the adapters a model holds and the active one's name live in the
model's adapter state (``lorakit.state``), which save/load and reports read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorakit.adapters.base import builder_for
from lorakit.config import AdapterConfig, ConfigError
from lorakit.quant.model import set_module
from lorakit.state import active_adapter, adapter_configs, state_of
from lorakit.surgery.layer import AdaptedLayer, AdapterStateError, TrainedCopy, bump_generation
from lorakit.surgery.targets import find_targets
from lorakit.weights import weight_access

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
RESERVED_NAMES = ("base", "__base__")


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def trained_copies(model: nn.Module) -> Iterator[tuple[str, TrainedCopy]]:
    for name, module in model.named_modules():
        if isinstance(module, TrainedCopy):
            yield name, module


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in RESERVED_NAMES:
        raise ConfigError(
            f"adapter_name={name!r} is invalid; use letters, digits, '_' or '-' (no path separators or "
            f"dots), and not one of {list(RESERVED_NAMES)}"
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` of ``model``, and mark model-wide caches stale."""
    set_module(model, name, new)
    bump_generation()  # the set of adapted layers changed: model-wide caches are stale


def inject(
    model: nn.Module,
    cfg: AdapterConfig,
    adapter_name: str = "default",
    activate: bool = True,
    strict_targets: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` built from ``cfg`` to ``model`` in place and return the model.

    Base weights are frozen; the new adapter (and its copies of ``modules_to_save``) is trainable when
    ``activate`` is True (it becomes the active adapter). Injecting an existing name is an error.
    Nothing is changed if any target fails to build. ``strict_targets=False`` lets a target list entry
    that matches no module warn instead of raise (adapter files, as PEFT reads them).
    """
    check_adapter_name(adapter_name)
    configs = dict(adapter_configs(model))
    if adapter_name in configs:
        raise AdapterStateError(f"adapter {adapter_name!r} is already in the model; delete it first or pick another name")
    for _, layer in adapted_layers(model):
        if layer.merged:
            raise AdapterStateError("the model has merged adapters; unmerge before adding another")
    targets = find_targets(model, cfg, strict=strict_targets)
    build = builder_for(cfg.method)
    built: list[tuple[str, nn.Module]] = []
    for name in targets:  # build everything first: a failure leaves the model untouched
        module = model.get_submodule(name)
        base = module.base if isinstance(module, AdaptedLayer) else module
        built.append((name, build(weight_access(base), cfg, name)))
    for name, adapter in built:
        module = model.get_submodule(name)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            replace_module(model, name, module)
        module.add(adapter_name, adapter)
    for save_name in _resolve_modules_to_save(model, cfg):
        module = model.get_submodule(save_name)
        if not isinstance(module, TrainedCopy):
            module = TrainedCopy(module)
            replace_module(model, save_name, module)
        module.add(adapter_name)
    configs[adapter_name] = cfg
    state_of(model).configs = configs
    bump_generation()  # the model's adapter names changed: routing checks are redone
    from lorakit.surgery.rows import install_row_routing  # rows builds on this module's walks

    install_row_routing(model)
    if activate or len(configs) == 1:
        set_adapter(model, adapter_name)
    else:
        _freeze(model, active=active_adapter(model))
    return model


def _resolve_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    names: list[str] = []
    for wanted in cfg.modules_to_save:
        hits = [
            n for n, m in model.named_modules()
            if (n == wanted or n.endswith("." + wanted)) and ".copies." not in n and not n.endswith(".original")
        ]
        if not hits:
            raise ConfigError(f"modules_to_save: no module named {wanted!r} in the model")
        names.extend(h for h in hits if h not in names)
    return names


def _freeze(model: nn.Module, active: str | None) -> None:
    """Only the active adapter's parameters (and its trained copies) require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    if active is None:
        return
    for _, layer in adapted_layers(model):
        if active in layer.adapters:
            layer.adapters[active].requires_grad_(True)
    for _, tc in trained_copies(model):
        if active in tc.copies:
            tc.copies[active].requires_grad_(True)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one (and the only trainable one) in every layer."""
    if name not in adapter_configs(model):
        raise AdapterStateError(f"no adapter named {name!r}; the model has {list(adapter_configs(model))}")
    for _, layer in adapted_layers(model):
        if layer.merged and name not in layer.merged:
            raise AdapterStateError("cannot switch adapters while one is merged; call lorakit.unmerge first")
        layer.active = name if name in layer.adapters else None
    for _, tc in trained_copies(model):
        tc.active = name if name in tc.copies else None
    state_of(model).active = name
    _freeze(model, name)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as its base (unmerged adapters bypassed)."""
    layers = [m for _, m in adapted_layers(model)] + [m for _, m in trained_copies(model)]
    if any(getattr(m, "merged", None) for m in layers):
        raise AdapterStateError("cannot disable adapters while one is merged; call lorakit.unmerge first")
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters revert to their base module."""
    configs = dict(adapter_configs(model))
    if name not in configs:
        raise AdapterStateError(f"no adapter named {name!r}; the model has {list(configs)}")
    for lname, layer in list(adapted_layers(model)):
        if name in layer.merged:
            raise AdapterStateError(f"adapter {name!r} is merged in {lname!r}; unmerge before deleting")
        if name in layer.adapters:
            layer.remove(name)
        if len(layer.adapters) == 0:
            replace_module(model, lname, layer.base)
    for tname, tc in list(trained_copies(model)):
        if name in tc.copies:
            del tc.copies[name]
            if tc.active == name:
                tc.active = None
        if len(tc.copies) == 0:
            replace_module(model, tname, tc.original)
    del configs[name]
    state_of(model).configs = configs
    bump_generation()
    if active_adapter(model) == name:
        state_of(model).active = None
        if configs:
            set_adapter(model, next(iter(configs)))
        else:
            _freeze(model, None)
    if not configs:  # the last adapter: the model is plain again, hooks and generate wrapper included
        from lorakit.surgery.rows import remove_row_routing

        remove_row_routing(model)
