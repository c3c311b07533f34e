"""Adapter registry: LRU bound, reload from disk after eviction (same outputs), add/remove, clear errors."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.serving import BASE, mixed_forward
from lorakit.serving.registry import AdapterRegistry, RegistryError, UnknownAdapterError

from .helpers import write_adapters


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_adapters(str(tmp_path_factory.mktemp("adapters")), ["a", "b", "c", "d"])


def test_lru_bound_and_reload_gives_same_outputs(dirs):
    model = lorakit.build_model("tiny-llama")
    reg = AdapterRegistry(model, max_loaded=2)
    for name, path in dirs.items():
        reg.register(name, path)
    assert reg.loaded() == [] and sorted(reg.names()) == ["a", "b", "c", "d"]
    x = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    reg.ensure(["a", "b", BASE])
    with torch.no_grad():
        first = mixed_forward(model, x, adapter_names=["a", "b", BASE]).logits
    reg.ensure(["c"])  # evicts the least recently used: a
    assert reg.loaded() == ["b", "c"] and "a" not in lorakit.adapter_configs(model)
    reg.ensure(["b"])
    reg.ensure(["d"])  # now c is the least recently used
    assert reg.loaded() == ["b", "d"]
    reg.ensure(["a", "b"])  # a reloads from disk
    with torch.no_grad():
        again = mixed_forward(model, x, adapter_names=["a", "b", BASE]).logits
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert reg.stats()["evictions"] == 3 and reg.stats()["loads"] == 5
    with pytest.raises(RegistryError, match="needs 3 adapters but max_loaded=2"):
        reg.ensure(["a", "b", "c"])


def test_add_remove_and_errors(dirs, tmp_path):
    model = lorakit.build_model("tiny-llama")
    reg = AdapterRegistry(model)
    reg.register("a", dirs["a"], load=True)
    assert reg.loaded() == ["a"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", dirs["a"])
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register("z", tmp_path / "missing")
    with pytest.raises(lorakit.ConfigError, match="adapter_name='base' is invalid"):
        reg.register("base", dirs["a"])
    with pytest.raises(UnknownAdapterError, match="no adapter named 'q'"):
        reg.ensure(["q"])
    (tmp_path / "broken").mkdir()
    with pytest.raises(ValueError):
        reg.register("broken", tmp_path / "broken", load=True)
    assert "broken" not in reg and reg.loaded() == ["a"]  # a failed load leaves nothing behind
    reg.remove("a")
    assert reg.names() == [] and lorakit.adapter_configs(model) == {}
    with pytest.raises(UnknownAdapterError):
        reg.remove("a")
    with pytest.raises(RegistryError, match="max_loaded=0"):
        AdapterRegistry(model, max_loaded=0)
