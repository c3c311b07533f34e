"""The adapters a server can serve: registered by name -> directory, at most ``max_loaded`` in memory.

Loading is cheap because an adapter is only its low-rank tensors (no copy of the base): ``ensure(names)``
loads what a batch needs with ``lorakit.io.load_adapter`` and evicts the least recently used adapters
that the batch does not need (``lorakit.delete_adapter``); an evicted adapter reloads from its directory
on the next request. Adapters can be added and removed while serving; every method holds ``lock``, which
the engine also holds while a batch runs, so the model never changes under a forward.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from torch import nn

from lorakit.serving.mixed import BASE
from lorakit.surgery.inject import adapter_configs, check_adapter_name, delete_adapter

Loader = Callable[[nn.Module, str, str], object]


class RegistryError(ValueError):
    """An adapter name or directory cannot be registered, or a batch needs more adapters than allowed."""


class UnknownAdapterError(RegistryError, KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _io_loader(model: nn.Module, path: str, name: str) -> object:
    from lorakit.io import load_adapter

    return load_adapter(model, path, name, activate=False)


class AdapterRegistry:
    """Name -> adapter directory, with at most ``max_loaded`` adapters injected into ``model`` at once.

    Args:
        model: the base model (adapters already injected count as pinned: they have no directory to
            reload from, so they are never evicted).
        max_loaded: bound on adapters held in memory (None = no bound).
        loader: ``loader(model, path, name)`` injects adapter ``name`` from ``path``
            (default ``lorakit.io.load_adapter``).
    """

    def __init__(self, model: nn.Module, max_loaded: int | None = None, loader: Loader | None = None) -> None:
        if max_loaded is not None and (not isinstance(max_loaded, int) or max_loaded < 1):
            raise RegistryError(f"max_loaded={max_loaded!r}: expected a positive integer or None")
        self.model, self.max_loaded = model, max_loaded
        self.loader = loader or _io_loader
        self.lock = threading.RLock()
        self.sources: dict[str, str | None] = {n: None for n in adapter_configs(model)}
        self._lru: OrderedDict[str, None] = OrderedDict((n, None) for n in adapter_configs(model))
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    # Reads take no lock (list() of a dict is atomic under the GIL): the server answers /v1/models and
    # /metrics while the engine holds the lock for a whole batch.
    def names(self) -> list[str]:
        """Every registered adapter (loaded or not)."""
        return list(self.sources)

    def loaded(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    # ------------------------------------------------------------------ changes
    def register(self, name: str, path: str | os.PathLike, load: bool = False) -> None:
        """Make adapter ``name`` servable from directory ``path`` (loaded now if ``load``, else on first use)."""
        check_adapter_name(name)
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise RegistryError(f"adapter {name!r}: directory {path!r} does not exist")
        with self.lock:
            if name in self.sources:
                raise RegistryError(f"adapter {name!r} is already registered; remove it first")
            self.sources[name] = path
            if load:
                try:
                    self.ensure([name])
                except BaseException:
                    del self.sources[name]
                    raise

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` and free its memory."""
        with self.lock:
            if name not in self.sources:
                raise UnknownAdapterError(f"no adapter named {name!r}; registered: {list(self.sources)}")
            if name in self._lru:
                delete_adapter(self.model, name)
                del self._lru[name]
            del self.sources[name]

    def ensure(self, names: Iterable[str]) -> None:
        """Load every adapter in ``names`` (the base name is skipped), evicting least recently used ones
        that ``names`` does not need; all of ``names`` count as just used."""
        with self.lock:
            wanted = list(dict.fromkeys(n for n in names if n != BASE))
            for n in wanted:
                if n not in self.sources:
                    raise UnknownAdapterError(f"no adapter named {n!r}; registered: {list(self.sources)}")
            if self.max_loaded is not None and len(wanted) > self.max_loaded:
                raise RegistryError(f"a batch needs {len(wanted)} adapters but max_loaded={self.max_loaded}")
            for n in wanted:
                if n in self._lru:
                    self._lru.move_to_end(n)
                    continue
                self._make_room(keep=set(wanted))
                self.loader(self.model, self.sources[n], n)
                self.loads += 1
                self._lru[n] = None

    def _make_room(self, keep: set[str]) -> None:
        if self.max_loaded is None:
            return
        while len(self._lru) >= self.max_loaded:
            victim = next((n for n in self._lru if n not in keep and self.sources.get(n) is not None), None)
            if victim is None:
                raise RegistryError(
                    f"cannot load another adapter: max_loaded={self.max_loaded} and every loaded adapter is "
                    "needed by this batch or has no directory to reload from"
                )
            delete_adapter(self.model, victim)
            del self._lru[victim]
            self.evictions += 1

    def stats(self) -> dict[str, object]:
        return {
            "registered": len(self.sources),
            "loaded": list(self._lru),
            "max_loaded": self.max_loaded,
            "loads": self.loads,
            "evictions": self.evictions,
        }
