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


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_atomic_writes_get_the_modes_a_plain_write_would(tmp_path, umask):
    """A server or teammate running as another user must be able to read what lorakit writes (issue 20)."""
    old = os.umask(umask)
    try:
        plain_dir = tmp_path / "plain"
        plain_dir.mkdir()
        (plain_dir / "f.txt").write_text("x")
        file_mode = os.stat(plain_dir / "f.txt").st_mode & 0o777
        dir_mode = os.stat(plain_dir).st_mode & 0o777

        atomic.atomic_write_text(str(tmp_path / "report.md"), "hello")
        assert os.stat(tmp_path / "report.md").st_mode & 0o777 == file_mode
        model = lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(r=2))
        out = tmp_path / "runs" / "adapter"
        lk.save_adapter(model, str(out))
        assert os.stat(out).st_mode & 0o777 == dir_mode
        for name in os.listdir(out):
            assert os.stat(out / name).st_mode & 0o777 == (dir_mode if (out / name).is_dir() else file_mode), name
        with atomic.atomic_directory(str(tmp_path / "d")) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
        assert os.stat(tmp_path / "d").st_mode & 0o777 == dir_mode
    finally:
        os.umask(old)


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    p = tmp_path / "shared.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic.atomic_write_text(str(p), "new")
    assert p.read_text() == "new" and os.stat(p).st_mode & 0o777 == 0o640
