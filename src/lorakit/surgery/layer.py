"""The adapted layer: the one wrapper that replaces a targeted module, and the trained copy that
replaces a module in ``modules_to_save``.

``AdaptedLayer.forward(x) = base(x)`` passed through the active adapter (``adapter(x, base_out, access)``).
Merging folds an adapter's dense update into the base weight explicitly and checks the result
(STYLE.md rule 3); it is never a side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterStateError  # re-exported: raised here and by the adapters below
from lorakit.weights import WeightAccess, weight_access

_clock = itertools.count(1)
_last_change = 0


def bump_generation() -> int:
    """A fresh generation number, never handed out before in this process; also records it as the latest
    change anywhere, so caches built over a whole model (``last_change``) know they may be stale."""
    global _last_change
    _last_change = next(_clock)
    return _last_change


def last_change() -> int:
    """The generation of the most recent adapter or module change made by lorakit (in any model)."""
    return _last_change


class AdaptedLayer(nn.Module):
    """A frozen base module plus named adapters, at most one active.

    Attributes:
        base: the untouched original module.
        adapters: adapter name -> adapter method module.
        active: name of the active adapter, or None.
        merged: names of adapters currently folded into the base weight (in merge order).
        disabled: when True the layer behaves as the base (used by ``lorakit.disabled``).
        generation: a number that changes on every add, remove, merge and unmerge (never reused), so
            caches derived from the adapters (the mixed-batch stacks) can tell they are stale.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        access = weight_access(base)
        if access is None:
            raise TypeError(f"cannot adapt a {type(base).__name__}")
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False
        self.generation = bump_generation()
        # Per-row adapter routing for mixed batches (set by lorakit.surgery.rows); None = whole batch.
        self.row_routing: Any = None
        self._access: tuple[nn.Module, WeightAccess] = (base, access)

    @property
    def access(self) -> WeightAccess:
        """The base's weight access, built once per base module (not on every forward)."""
        base, access = self._access
        if base is not self.base:  # the base module was replaced
            access = weight_access(self.base)
            self._access = (self.base, access)
        return access

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base
        out = base(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_routing is not None:
            return self.row_routing(self, x, out)
        if self.merged or self.active is None:
            return out
        cached, access = self._access  # plain attributes: no per-call objects on the decode path
        if cached is not base:
            access = self.access
        return self.adapters[self.active](x, out, access)

    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise AdapterStateError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        self.generation = bump_generation()

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (it must not be merged); the layer keeps its other adapters."""
        if name in self.merged:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge before deleting")
        del self.adapters[name]
        if self.active == name:
            self.active = None
        self.generation = bump_generation()

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight; refuses non-finite results and double merges.

        An adapter whose update depends on the weight it is merged into (DoRA) may define
        ``merge_weight(access, w) -> w'`` and ``unmerge_weight(access, w') -> w``; otherwise
        w' = w + delta_weight(access).
        """
        if name in self.merged:
            raise AdapterStateError(f"adapter {name!r} is already merged")
        adapter, access = self.adapters[name], self.access
        w = access.dense_weight(torch.float32)
        if hasattr(adapter, "merge_weight"):
            merged = adapter.merge_weight(access, w)
        else:
            merged = w + adapter.delta_weight(access).float()
        if not torch.isfinite(merged).all():
            raise AdapterStateError(f"merging adapter {name!r} gives non-finite weights; nothing was changed")
        access.set_dense_weight(merged)
        self.merged.append(name)
        self.generation = bump_generation()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, most recent first."""
        access = self.access
        self.generation = bump_generation()
        while self.merged:
            adapter = self.adapters[self.merged.pop()]
            w = access.dense_weight(torch.float32)
            if hasattr(adapter, "unmerge_weight"):
                access.set_dense_weight(adapter.unmerge_weight(access, w))
            else:
                access.set_dense_weight(w - adapter.delta_weight(access).float())

    def extra_repr(self) -> str:
        return f"active={self.active!r}, adapters={list(self.adapters)}, merged={self.merged}"


class TrainedCopy(nn.Module):
    """A module from ``modules_to_save``: each adapter trains its own full copy (e.g. a classifier
    head); the original stays frozen and is used when no adapter is active or adapters are disabled."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> nn.Module:
        if name in self.copies:
            raise AdapterStateError(f"adapter {name!r} already has a trained copy of this module")
        self.copies[name] = copy.deepcopy(self.original)
        return self.copies[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active is None or self.active not in self.copies:
            return self.original(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)
