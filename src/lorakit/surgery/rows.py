"""One adapter per row: ``model(..., adapter_names=[...])``, ``model.generate(..., adapter_names=[...])`` and
the ``adapter_rows`` context, on any model that carries lorakit adapters.

``inject`` (and so ``load_adapter`` and ``combine_adapters``) calls ``install_row_routing``, which adds

- a forward pre-hook on the model (``with_kwargs``) that takes ``adapter_names`` out of the call's keywords
  (transformers' ``**kwargs`` would swallow it and run the active adapter for every row) and routes that
  forward per row, and a forward hook (``always_call``: also when forward raises) that removes the routing;
- an instance-level ``generate`` that accepts ``adapter_names`` (HF's ``generate`` rejects keywords its
  model's ``forward`` does not name) and routes every step of the generation.

Both are ordinary attributes of the model (hooks in its hook dicts, a small callable object in its
``__dict__``) that reach the model through the module they are called on, so ``copy.deepcopy(model)`` (TRL's
reference models) gives a copy that routes with its own layers. The walk over the model, the checks and the
per-layer routers of a row plan are cached until lorakit next changes an adapter (``last_change``); the
per-layer math is in ``lorakit.surgery.stacks``.

Mixed batches are for inference: the stacked factors are detached copies and no dropout is applied, so
``adapter_names`` in training mode raises (as in PEFT). DoRA/AdaLoRA/conv adapters, merged layers and
adapters with ``modules_to_save`` raise ``MixedBatchError`` when a batch asks for them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.state import peek_state, state_of
from lorakit.surgery.inject import RESERVED_NAMES, adapted_layers, adapter_configs, trained_copies
from lorakit.surgery.layer import AdaptedLayer, TrainedCopy, last_change
from lorakit.surgery.stacks import (
    Bins,
    add_low_rank,
    bins_for,
    layer_stacks,
    registrations,
    supported,
    unchanged,
)

BASE = RESERVED_NAMES[0]  # the row name that selects the plain base model ("base")
_MAX_PLANS = 8  # row plans whose routers the hook path keeps per model


class MixedBatchError(ValueError):
    """A mixed-adapter batch cannot be run as asked (unknown name, unsupported adapter, merged layer)."""


class RowPlan:
    """Which adapter each row of the batch uses; shared by every layer's router during a forward."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.version = 0  # bumped by select(), so routers rebuild their bins

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
    """``AdaptedLayer.row_routing`` for one layer: base(x) + the low-rank term of each row's adapter."""

    __slots__ = ("plan", "_key", "_stacks", "_bins", "_single", "_watch", "_registrations")

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self._key: tuple = ()
        self._stacks: Any = None
        self._bins: Bins | None = None
        self._single: str | None = None
        self._watch: list[tuple] = []  # the stack slots this layout reads, checked on every call
        self._registrations = -1

    def _layout(self, layer: AdaptedLayer, key: tuple) -> None:
        """Stacks (fully checked) and bins for this plan, batch and row length."""
        stacks = self._stacks = layer_stacks(layer)
        self._key, self._registrations = key, registrations()
        row_slots = [stacks.slots.get(n, stacks.zero) for n in self.plan.rows(key[1])]
        first = row_slots[0]
        if all(s == first for s in row_slots):  # one route for the whole batch: no gather at all
            self._single, self._bins = (None if first == stacks.zero else stacks.names[first]), None
        else:
            self._single, self._bins = None, bins_for(stacks, row_slots, key[2])
        self._watch = [stacks.sources[s] for s in sorted(set(row_slots)) if s != stacks.zero]

    def __call__(self, layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = x.numel() // (batch * x.shape[-1]) if x.is_floating_point() else x.numel() // batch
        key = (self.plan.version, batch, tokens, layer.generation)
        if key != self._key:
            self._layout(layer, key)
        elif self._bins is not None and (
            self._registrations != registrations() or not unchanged(self._watch)
        ):
            self._layout(layer, key)  # weights changed in place (an optimizer step), moved or swapped
        if self._bins is None:
            if self._single is None:
                return out
            return layer.adapters[self._single](x, out, layer.access)  # the plain single-adapter path
        return add_low_rank(self._stacks, self._bins, x, out)


@dataclass(eq=False)
class _Table:
    """What routing needs from one model, valid until lorakit next changes an adapter anywhere."""

    generation: int
    layers: list[AdaptedLayer]
    copies: list[TrainedCopy]
    checked: set[tuple[str, ...]] = field(default_factory=set)  # adapter sets that passed the checks
    routers: dict[tuple[str, ...], list[_Router]] = field(default_factory=dict)  # hook path, per row names


_TABLES: weakref.WeakKeyDictionary[nn.Module, _Table] = weakref.WeakKeyDictionary()


def _table(model: nn.Module) -> _Table:
    table = _TABLES.get(model)
    if table is None or table.generation != last_change():
        table = _Table(
            last_change(), [m for _, m in adapted_layers(model)], [m for _, m in trained_copies(model)]
        )
        _TABLES[model] = table
    return table


def _names(adapter_names: Any) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise MixedBatchError(
            f"adapter_names must be a non-empty list with one name per row, got {adapter_names!r}"
        )
    return [BASE if n in RESERVED_NAMES else n for n in adapter_names]


def _check(model: nn.Module, table: _Table, names: list[str]) -> None:
    """Every name is known and runs as a mixed batch (LoRA, no merged layer, no trained copy)."""
    if model.training:
        raise MixedBatchError(
            "adapter_names is for inference (mixed batches apply no dropout and train nothing); "
            "call model.eval() first"
        )
    used = tuple(dict.fromkeys(names))
    if used in table.checked:
        return
    known = adapter_configs(model)
    for n in used:
        if n != BASE and n not in known:
            raise MixedBatchError(
                f"adapter_names: no adapter named {n!r}; the model has {list(known)} (or {BASE!r})"
            )
    wanted = set(used) - {BASE}
    for layer in table.layers:
        if layer.merged:
            raise MixedBatchError(
                f"layer {_path(model, layer)!r} has merged adapters {layer.merged}; unmerge before mixed batches"
            )
        for n in sorted(wanted & set(layer.adapters)):
            if not supported(layer.adapters[n]):
                raise MixedBatchError(
                    f"adapter {n!r} on layer {_path(model, layer)!r} is a {type(layer.adapters[n]).__name__}; "
                    "mixed batches support LoRA and rsLoRA on linear and embedding layers"
                )
    for tc in table.copies:
        hit = sorted(wanted & set(tc.copies))
        if hit:
            raise MixedBatchError(
                f"adapter {hit[0]!r} has a trained copy of {_path(model, tc)!r} (modules_to_save); mixed "
                "batches support adapters without modules_to_save"
            )
    table.checked.add(used)


def _path(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?")


def _install(table: _Table, routers: list[_Router]) -> tuple[list, list]:
    """Route every layer with its router; no row uses a trained copy (checked), so each sees the original."""
    previous = [layer.row_routing for layer in table.layers], [tc.disabled for tc in table.copies]
    for layer, router in zip(table.layers, routers):
        layer.row_routing = router
    for tc in table.copies:
        tc.disabled = True
    return previous


def _restore(table: _Table, previous: tuple[list, list]) -> None:
    for layer, was in zip(table.layers, previous[0]):
        layer.row_routing = was
    for tc, was in zip(table.copies, previous[1]):
        tc.disabled = was


@contextmanager
def adapter_rows(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[RowPlan]:
    """Within the block, row ``i`` of every forward through ``model`` uses adapter ``adapter_names[i]``
    (``"base"`` for the plain base). A batch that is a multiple of ``len(adapter_names)`` repeats each
    name (generation with beams or several sequences per prompt). Yields the ``RowPlan``."""
    names = _names(adapter_names)
    table = _table(model)
    _check(model, table, names)
    plan = RowPlan(names)
    previous = _install(table, [_Router(plan) for _ in table.layers])
    try:
        yield plan
    finally:
        _restore(table, previous)


# ------------------------------------------------------------------------- the model-level hooks
def _end_hook_rows(model: nn.Module) -> None:
    state = peek_state(model)  # hook_rows: set while a hook-routed forward runs
    if state is not None and state.hook_rows is not None:
        table_and_previous, state.hook_rows = state.hook_rows, None
        _restore(*table_and_previous)


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Take ``adapter_names`` out of the call and route this forward per row."""
    _end_hook_rows(model)  # left by a forward that a KeyboardInterrupt (not an Exception) ended
    if "adapter_names" not in kwargs:
        return None
    adapter_names = kwargs.pop("adapter_names")
    if adapter_names is not None:
        names = _names(adapter_names)
        table = _table(model)
        _check(model, table, names)
        key = tuple(names)
        routers = table.routers.get(key)
        if routers is None:
            if len(table.routers) >= _MAX_PLANS:
                table.routers.pop(next(iter(table.routers)))
            plan = RowPlan(names)  # never exposed, so never select()-ed: safe to reuse
            routers = table.routers[key] = [_Router(plan) for _ in table.layers]
        state_of(model).hook_rows = (table, _install(table, routers))
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    _end_hook_rows(model)


class _RowGenerate:
    """``model.generate`` that takes ``adapter_names`` (one per prompt) and routes every decode step."""

    def __init__(self, model: nn.Module, inner: Any = None) -> None:
        self.model, self.inner = model, inner  # inner: an instance-level generate that was there before
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        generate = self.inner if self.inner is not None else type(self.model).generate.__get__(self.model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        with adapter_rows(self.model, adapter_names):
            return generate(*args, **kwargs)


def is_routing_hook(hook: Any) -> bool:
    """True for the forward hooks ``install_row_routing`` puts on a model (a no-op without
    ``adapter_names``): code that must know whether a model's forward is its own can ignore them."""
    return hook is _pre_hook or hook is _post_hook


def install_row_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=...)`` and ``model.generate(..., adapter_names=...)`` route rows
    (idempotent; ``inject`` calls it). Without ``adapter_names`` nothing changes."""
    if not any(h is _pre_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    current = model.__dict__.get("generate")
    if callable(getattr(type(model), "generate", None)) and not isinstance(current, _RowGenerate):
        model.generate = _RowGenerate(model, current)


def remove_row_routing(model: nn.Module) -> None:
    """Undo ``install_row_routing`` (``unload`` gives back the plain model)."""
    for hooks, flags in (
        (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
        (model._forward_hooks, model._forward_hooks_with_kwargs),
    ):
        for key in [k for k, h in hooks.items() if h in (_pre_hook, _post_hook)]:
            del hooks[key]
            flags.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
    current = model.__dict__.get("generate")
    if isinstance(current, _RowGenerate):
        if current.inner is not None:
            model.generate = current.inner
        else:
            del model.__dict__["generate"]
    _TABLES.pop(model, None)
