"""Process memory: current and peak resident set size, in MiB.

Peak RSS is read from ``/proc/self/status`` (``VmHWM``), which starts afresh at ``exec``. The usual
``resource.getrusage(...).ru_maxrss`` does not: on Linux a child process inherits its parent's peak, so a
measurement subprocess started by a large parent would report the parent's figure. Elsewhere (macOS)
``ru_maxrss`` is the fallback (bytes there, KiB on Linux).
"""

from __future__ import annotations

import os
import resource
import sys


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (exec), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw / 2**20 if sys.platform == "darwin" else raw / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    return peak_rss_mib()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def held_tensor_bytes() -> int:
    """Bytes of every tensor storage this process's Python objects hold (each storage once, at its current
    size: a storage resized to 0, as FSDP2 does to gathered weights after use, counts 0). Counts shards,
    leftover full copies, optimizer state and buffers alike; wrapper tensors without storage of their own
    (a DTensor) count through their local tensor. Meta tensors count 0."""
    import gc

    import torch

    seen: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookups on proxies
            continue
        try:
            st = obj.untyped_storage()
            if st.device.type == "meta":
                continue
            key, size = (str(st.device), st.data_ptr()), st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # a wrapper subclass (DTensor; its local tensor is another object here), a freed storage
        seen[key] = max(seen.get(key, 0), size)
    return sum(seen.values())
