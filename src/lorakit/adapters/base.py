"""The adapter-method interface and the method registry.

An adapter method is an ``nn.Module`` holding one adapter's parameters, built from flat arguments. The
adapted layer (``lorakit.surgery.layer.AdaptedLayer``) calls it as ``adapter(x, base_out, access)`` and
uses what it returns as the layer's output; the adapter never holds a reference to the base module.

A registry maps a method name ("lora", "dora", "adalora") to a builder that turns an ``AdapterConfig``
into an adapter for one base module (STYLE.md rule 5: configs become flat arguments in one place).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from lorakit.config import AdapterConfig, ConfigError
from lorakit.weights import WeightAccess


@runtime_checkable
class AdapterMethod(Protocol):
    """What every adapter method provides (PEFT-compatible tensor names through ``peft_state``)."""

    r: int
    scaling: float

    def __call__(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        """The adapted layer's output given the base output ``base_out = base(x)``."""
        ...

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        """The dense update W' - W in the canonical layout of ``access`` (fp32), for merge/unmerge."""
        ...

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's names relative to the module path, e.g. ``lora_A.weight``."""
        ...

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in ``peft_state`` (shapes checked, errors name the tensor)."""
        ...


# method name -> builder(access, cfg, module_name) -> adapter module
Builder = Callable[[WeightAccess, AdapterConfig, str], torch.nn.Module]
_BUILDERS: dict[str, Builder] = {}
_MODULES = {"lora": "lorakit.adapters.lora", "dora": "lorakit.adapters.dora", "adalora": "lorakit.adapters.adalora"}


def register_method(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder for ``AdapterConfig(method=name)``."""

    def deco(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return deco


def builder_for(method: str) -> Builder:
    if method not in _BUILDERS and method in _MODULES:
        try:
            importlib.import_module(_MODULES[method])
        except ModuleNotFoundError as e:
            if e.name != _MODULES[method]:
                raise
    if method not in _BUILDERS:
        raise ConfigError(f"method={method!r} is not available; registered methods: {sorted(_BUILDERS)}")
    return _BUILDERS[method]


# method name -> factory(model, adapter_name, cfg) -> list of trainer callbacks the method needs
_CALLBACKS: dict[str, Callable[..., list]] = {}


def register_callbacks(name: str) -> Callable[[Callable[..., list]], Callable[..., list]]:
    """Decorator registering ``factory(model, adapter_name, cfg) -> [Callback, ...]`` for a method."""

    def deco(factory: Callable[..., list]) -> Callable[..., list]:
        _CALLBACKS[name] = factory
        return factory

    return deco


def method_callbacks(model: torch.nn.Module, adapter_name: str | None = None) -> list:
    """The trainer callbacks the model's active (or named) adapter method needs (e.g. AdaLoRA's budget)."""
    configs = getattr(model, "lorakit_configs", {})
    name = adapter_name or getattr(model, "lorakit_active", None)
    if name is None or name not in configs:
        return []
    cfg = configs[name]
    builder_for(cfg.method)  # imports the method's module, which registers its callbacks
    factory = _CALLBACKS.get(cfg.method)
    return list(factory(model, name, cfg)) if factory else []


def check_shapes(owner: str, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise a clear error if ``state`` lacks, adds or mis-shapes any of the ``expected`` tensors."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"{owner}: missing tensors {missing}, unexpected tensors {extra}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{owner}.{key}: shape {tuple(state[key].shape)} does not match the model's {tuple(ref.shape)}"
            )


@torch.no_grad()
def copy_peft_state(owner: str, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """``load_peft_state`` for adapters whose tensors map one to one: check names and shapes, then copy
    ``state`` into ``own`` (the adapter's ``peft_state()``) in the adapter's dtypes."""
    check_shapes(owner, state, own)
    for key, t in own.items():
        t.copy_(state[key].to(t.dtype))

