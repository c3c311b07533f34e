"""A run stopped from outside -- Ctrl-C, or SIGTERM from a launcher or a scheduler -- ends with one line that
names the last checkpoint, on every process.

Python turns Ctrl-C into ``KeyboardInterrupt``; SIGTERM (what ``torchrun``'s agent sends every other rank
when one rank fails, and what SLURM or Kubernetes send before a preemption) would otherwise end the process
at once, with no word of where the run stands. While :func:`sigterm_raises` is active, SIGTERM raises
:class:`Terminated` in the main thread instead, so the trainer's cleanup runs (an ``--overwrite`` that had
not swapped in yet leaves the previous run as it was) and :func:`stopped` says what to do next. A host
program that installed its own SIGTERM handler keeps it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while :func:`sigterm_raises` is active."""

    exit_code = 143


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; the message names the last checkpoint. ``exit_code``: 130 for
    Ctrl-C, 143 for SIGTERM (128 + the signal number, as a shell reports them)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # the host program's own handler, or SIG_IGN: leave it
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_sigterm(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: a forked worker takes SIGTERM the default way (ends quietly), not
    through the trainer's handler it inherited."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stopped(e: KeyboardInterrupt, rank: int | None, last_checkpoint: str | None) -> TrainingStopped:
    """The one-line error for a run that ``e`` stopped; ``rank`` is None for a single process."""
    term = isinstance(e, Terminated)
    who = "" if rank is None else f"rank {rank}: "
    why = "stopped by SIGTERM" if term else "interrupted"
    if term and rank is not None:
        why += " (torchrun stops every rank when one fails: see the other ranks' output)"
    where = f"last checkpoint: {last_checkpoint}; continue with --resume" if last_checkpoint else (
        "no checkpoint was written yet")
    return TrainingStopped(f"{who}{why}; {where}", 143 if term else 130)
