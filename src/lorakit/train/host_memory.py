"""Resident memory that follows what the process holds (``training.return_freed_memory``), on glibc.

glibc serves an allocation of at least its *mmap threshold* with its own mapping, unmapped on free; smaller
ones come from the heap, whose freed space stays resident for reuse. The threshold starts at 128 KiB but
moves up to the size of any mapped block that is freed (up to 32 MiB), so after the first large tensor
is freed, every later activation of that size lands on the heap. A training step frees and reallocates
tensors of many sizes in a different order each time, the heap fragments, and the peak resident memory of
a CPU run grows to about twice what autograd holds (a 6-layer Qwen2.5-0.5B-shaped LoRA step, 2 x 1,024
tokens: 2,691 MB with glibc's default, 1,697 MB with a fixed 1 MiB threshold).

``return_freed_memory()`` fixes the threshold (``mallopt(M_MMAP_THRESHOLD, 16 MiB)``), which also stops
its adjustment, so every tensor of 16 MiB or more is mapped and unmapped. The price is a page fault per
4 KiB page of every such allocation (the kernel hands out zeroed pages); below 16 MiB nothing changes.
Measured on the Qwen2.5-0.5B shape, 24 layers, LoRA all-linear, 2 x 1,024 tokens, bf16 (2 quiet cores):
peak RSS 7,783 MB -> 5,364 MB (PEFT + transformers: 13,711 MB), step 8.2 s -> 9.4 s (PEFT: 11.8 s); a
1 MiB threshold: 4,211 MB but 12.4 s; 32 MiB: no gain. On the llama-15m shape with a 30,522 vocabulary
(8 x 120-512 tokens) the step time is unchanged. Process-wide (glibc has no per-allocation switch) and
kept after the run; ``training.return_freed_memory: false`` leaves glibc's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 16 << 20  # 16 MiB: measured below


def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> str | None:
    """Map allocations of ``threshold`` bytes or more on their own, so freeing them returns the memory.
    Returns None when applied, else why not (not Linux, no glibc, refused)."""
    if not sys.platform.startswith("linux"):
        return f"the allocator policy is glibc's (Linux); this is {sys.platform}"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no glibc mallopt in this process (another C library)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return f"mallopt(M_MMAP_THRESHOLD, {threshold}) was refused"
    return None


def apply_config(enabled: bool) -> None:
    """``training.return_freed_memory`` (a policy of glibc's allocator: nothing to do off Linux): apply it,
    or on Linux warn in one line why it cannot be (another C library, say)."""
    if not enabled or not sys.platform.startswith("linux"):
        return
    if (why := return_freed_memory()) is not None:
        import warnings

        warnings.warn(f"training.return_freed_memory is not applied: {why}", stacklevel=2)
