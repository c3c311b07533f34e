"""Atomic writes: a failure mid-save leaves the previous file/adapter in place and no temp files."""

import os

import pytest
import torch

import lorakit as lk
from lorakit.io import adapter_files as af
from lorakit.io import atomic, load_adapter, save_adapter


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic.atomic_write_text(str(path), "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(str(path), broken)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
    atomic.atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_swaps_and_keeps_other_entries(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "adapter"
    (target / "other").mkdir(parents=True)
    (target / "other" / "keep.txt").write_text("other adapter")
    (target / "a.txt").write_text("old a")
    with atomic.atomic_directory(str(target)) as tmp:
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("new a")
        assert (target / "a.txt").read_text() == "old a"  # nothing visible before the swap
    assert (target / "a.txt").read_text() == "new a"
    assert (target / "other" / "keep.txt").read_text() == "other adapter"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_crash_mid_save_keeps_the_good_adapter(tmp_path, monkeypatch):
    model = lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    good = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(af, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "a")
    assert {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")} == good
    assert os.listdir(tmp_path) == ["a"]  # no temp directory left behind
    load_adapter(lk.build_model("tiny-llama"), tmp_path / "a")  # still loads
