"""The adapter-method interface (AdapterMethod), shape-checked state loading, older registry decorators.

An adapter method is an ``nn.Module`` holding one adapter's parameters, built from flat arguments. The
adapted layer (``lorakit.surgery.layer.AdaptedLayer``) calls it as ``adapter(x, base_out, access)`` and
uses what it returns as the layer's output; the adapter never holds a reference to the base module.

Which methods exist, and everything about each, is in the method registry (``lorakit.methods``); each
method's file registers its entry. The decorators here are the older way to add a builder or callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from lorakit import methods
from lorakit.config import ConfigError
from lorakit.methods import Builder, CallbackFactory
from lorakit.state import active_adapter, adapter_configs
from lorakit.weights import WeightAccess


def adapter_input(x: torch.Tensor, dtype: torch.dtype, cast: bool = False) -> torch.Tensor:
    """x for the adapter's matmuls held in ``dtype``: cast only when that changes the product.

    Under autocast, an input that already has the autocast dtype is left as it is (a matmul would cast the
    adapter-dtype copy straight back: x -> fp32 -> bf16 is x again, bit for bit), which saves two copies of
    x per adapted layer, one of them kept for backward. ``cast=True`` (e.g. dropout will act on x next)
    always casts, so elementwise work before the matmul sees the adapter dtype, as in PEFT."""
    if x.dtype == dtype:
        return x
    kind = x.device.type
    if not cast and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == x.dtype:
        return x
    return x.to(dtype)


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


def register_method(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` as method ``name``'s (a new entry adapts every layer kind and
    has no file format). For a full entry -- layer kinds, PEFT codec, own config fields, callbacks --
    use ``lorakit.methods.register(Method(...))``, as the built-in methods do."""

    def deco(builder: Builder) -> Builder:
        if name in methods.names():
            methods.replace(name, builder=builder)
        else:
            methods.register(methods.Method(name, builder, kinds=tuple(methods.KINDS)))
        return builder

    return deco


def builder_for(method: str) -> Builder:
    """The checked builder of a registered method (``Method.build``)."""
    return methods.get(method).build


def register_callbacks(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    """Decorator setting ``factory(model, adapter_name, cfg) -> [Callback, ...]`` on method ``name``'s
    registry entry (``Method.callbacks``)."""

    def deco(factory: CallbackFactory) -> CallbackFactory:
        methods.replace(name, callbacks=factory)
        return factory

    return deco


def method_callbacks(model: torch.nn.Module, adapter_name: str | None = None) -> list:
    """The trainer callbacks the model's active (or named) adapter method needs (e.g. AdaLoRA's budget)."""
    configs = adapter_configs(model)
    name = adapter_name or active_adapter(model)
    if name is None or name not in configs:
        return []
    cfg = configs[name]
    factory = methods.get(cfg.method).callbacks
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


def named_param_groups(
    prefix: str, groups: dict[str, list], settings: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """Optimizer groups from ``groups`` (key -> parameters) with ``settings[key] = (lr, weight_decay)``,
    in ``groups``' order, empty ones left out, each named ``prefix_key``; a method's optimizer setting
    (LoRA+, AdaLoRA's λ rate) builds its groups with it. No parameter at all is a ConfigError."""
    out = [
        {"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": f"{prefix}_{k}"}
        for k, ps in groups.items()
        if ps
    ]
    if not out:
        raise ConfigError("the adapter config left no trainable parameters (check target_modules)")
    return out
