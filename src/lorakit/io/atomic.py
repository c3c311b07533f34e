"""Atomic writes: a crash mid-save never leaves a half-written file or directory in place of a good one.

- ``atomic_write(path, write)``: ``write(tmp_path)`` fills a temporary file in the same directory, which
  is fsync'ed and renamed over ``path`` with ``os.replace`` (atomic on POSIX), then the directory is
  fsync'ed so the rename itself is durable.
- ``atomic_directory(path)``: a context manager yielding a temporary directory beside ``path``; on a
  clean exit its files are fsync'ed and it takes ``path``'s place. Entries of an existing ``path`` that
  the new content does not replace (e.g. sub-folders of other adapters) are hard-linked (or copied) in
  first, so they survive. The swap uses Linux ``renameat2(RENAME_EXCHANGE)`` when available (one atomic
  step); otherwise two renames, where a crash in between leaves the old directory complete under a
  ``.<name>.old-*`` name, never a half-written one. On an exception the temporary directory is removed
  and ``path`` is untouched.

Both end with the permissions a plain write would give (``mkstemp``/``mkdtemp`` create private 0600/0700
entries): the mode of the file or directory being replaced, else 0666/0777 less the process umask, so a
server or a teammate running as another user can read a saved adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside directory ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(path: str, tmp: str, directory: bool) -> None:
    """Give ``tmp`` the mode a plain write of ``path`` would end with (see the module docstring)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = (0o777 if directory else 0o666) & ~_umask()
    os.chmod(tmp, mode)


def _plain_tree_modes(root: str) -> None:
    """Give every file and sub-directory under ``root`` the mode a plain creation would have."""
    mask = _umask()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` creates the temp file, then fsync + os.replace."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        _plain_mode(path, tmp, directory=False)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (or copy, where links are unsupported) ``src`` to ``dst``, files or directories."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _fsync_file(p)
        fsync_dir(dirpath)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temp directory; on success it replaces ``path`` atomically (see the module docstring)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        _plain_tree_modes(tmp)  # writers such as safetensors' save_file create private files too
        if os.path.isdir(path):
            for entry in os.listdir(path):
                if not os.path.lexists(os.path.join(tmp, entry)):
                    _link_tree(os.path.join(path, entry), os.path.join(tmp, entry))
        _plain_mode(path, tmp, directory=True)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.isdir(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
    else:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)
