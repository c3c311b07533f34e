"""The adapter state of a model: one object on the model, read and written only through these accessors.

    state = state_of(model)        # created on first use
    state.configs["default"]       # adapter name -> AdapterConfig
    state.active                   # the active adapter's name (None: none)

What it holds, and who writes it:

- ``configs``, ``active``: ``lorakit.surgery.inject`` (inject, set_adapter, delete_adapter); AdaLoRA's
  controller records the ``total_step`` it ran with.
- ``peft_meta``: what an adapter file said beyond the config (``task_type``, ...), by ``lorakit.io``.
- ``quant``: the QuantConfig a model was quantized with, by ``lorakit.quant``.
- ``controllers``: AdaLoRA's budget controllers of ``adalora_step``, per adapter name.
- ``hook_rows``: the per-row routing installed for one ``model(..., adapter_names=...)`` call, by
  ``lorakit.surgery.rows`` (None between calls).

The object lives in the model's ``__dict__`` (``model.lorakit_state``), so ``copy.deepcopy(model)`` (which
TRL does for its reference model) copies it with the model. ``configs`` and ``peft_meta`` are replaced,
never mutated in place, so :meth:`AdapterState.copy` is a snapshot a failed load can put back
(``lorakit.io.adapter_files``). This module sits at the bottom of the package: it imports nothing of
lorakit at run time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from lorakit.config import AdapterConfig, QuantConfig

ATTR = "lorakit_state"


@dataclass
class AdapterState:
    """Everything lorakit keeps on a model besides its modules (see the module docstring)."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: str | None = None
    peft_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant: QuantConfig | None = None
    controllers: dict[str, Any] = field(default_factory=dict)
    hook_rows: Any = None

    def copy(self) -> AdapterState:
        """A snapshot: the same values in fresh containers (the values themselves are not copied)."""
        return dataclasses.replace(
            self, configs=dict(self.configs), peft_meta=dict(self.peft_meta), controllers=dict(self.controllers)
        )

    def clear_adapters(self) -> None:
        """Forget every adapter (``unload``); the quantization record stays, as the base stays quantized."""
        self.configs, self.active, self.peft_meta, self.controllers = {}, None, {}, {}

    def is_empty(self) -> bool:
        return self == AdapterState()


def peek_state(model: nn.Module) -> AdapterState | None:
    """The model's state, or None when lorakit never touched it (creates nothing)."""
    return model.__dict__.get(ATTR)


def state_of(model: nn.Module) -> AdapterState:
    """The model's state, created empty on first use."""
    state = model.__dict__.get(ATTR)
    if state is None:
        state = model.__dict__[ATTR] = AdapterState()
    return state


def set_state(model: nn.Module, state: AdapterState | None) -> None:
    """Replace the model's state (None, or an empty state: remove it, leaving a plain model)."""
    if state is None or state.is_empty():
        model.__dict__.pop(ATTR, None)
    else:
        model.__dict__[ATTR] = state


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter name -> config for the adapters injected into ``model`` (empty if none). Read-only."""
    state = peek_state(model)
    return state.configs if state is not None else {}


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (None when there is none)."""
    state = peek_state(model)
    return state.active if state is not None else None
