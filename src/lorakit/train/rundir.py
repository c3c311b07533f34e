"""Where a run writes, and how ``--overwrite`` replaces a previous run without ever losing it first.

A fresh run and a resumed run write into ``output.dir`` itself. Overwriting an existing run writes into a
staging directory beside it (``.<name>.staging``) and swaps it in only once the new run has something to
show: its first checkpoint, or its end when it saves no checkpoints. So a new run that fails to start (a
bad data path, a model that will not load), fails later before that point, or is killed (even with
SIGKILL), leaves the old run exactly as it was; a stale staging directory is removed by the next start.

The swap moves the old run's artifacts into a ``.replaced-*`` directory inside ``output.dir``, moves the
new ones in, then deletes the old: each move is a rename on the same file system, and a crash between
them leaves both runs complete on disk, never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from lorakit.io.atomic import fsync_dir
from lorakit.train import checkpoint as ckpt

# What a run leaves in its output directory (anything else there is the user's and is left alone).
ARTIFACTS = ckpt.ARTIFACTS


class OutputDirError(ValueError):
    """The output directory holds another run and neither resume nor overwrite was asked for."""


def _occupied(out: str) -> bool:
    return os.path.isdir(out) and any(os.path.exists(os.path.join(out, a)) for a in ARTIFACTS)


class RunDir:
    """The directory a run writes into now (``path``) and where it ends up (``final``)."""

    def __init__(self, final: str, staging: str | None) -> None:
        self.final, self.staging = final, staging

    @property
    def path(self) -> str:
        return self.staging or self.final

    def promote(self, is_main: bool) -> None:
        """Swap a staged run in for the previous one (no-op when not staging); only rank 0 touches files."""
        if self.staging is None:
            return
        if is_main:
            trash = tempfile.mkdtemp(prefix=".replaced-", dir=self.final)
            for a in ARTIFACTS:
                if os.path.lexists(os.path.join(self.final, a)):
                    os.rename(os.path.join(self.final, a), os.path.join(trash, a))
            for entry in os.listdir(self.staging):
                os.rename(os.path.join(self.staging, entry), os.path.join(self.final, entry))
            fsync_dir(self.final)
            shutil.rmtree(trash, ignore_errors=True)
            os.rmdir(self.staging)
        self.staging = None

    def discard(self, is_main: bool) -> None:
        """Drop an unpromoted staging directory (the new run failed; the old one stays)."""
        if self.staging is not None and is_main:
            shutil.rmtree(self.staging, ignore_errors=True)


def prepare(out: str, resume: bool, overwrite: bool, is_main: bool) -> tuple[RunDir, str | None]:
    """Check ``out`` (refuse to mix two runs) and return (where to write, checkpoint to resume from)."""
    root = os.path.join(out, "checkpoints")
    if resume:
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {root!r}")
        return RunDir(out, None), latest
    if not _occupied(out):
        return RunDir(out, None), None
    if not overwrite:
        raise OutputDirError(
            f"output dir {out!r} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    out = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.staging")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a new run that was killed before its swap
        os.makedirs(staging)
    return RunDir(out, staging), None
