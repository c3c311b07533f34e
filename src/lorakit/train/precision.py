"""Training precision: what ``training.mixed_precision`` resolves to on this device, and why.

``auto`` picks bf16 autocast wherever the hardware computes bf16 natively — CUDA GPUs that support it, and
CPUs whose flags say so (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``; read from /proc/cpuinfo, never
guessed from the CPU model) — fp16 with loss scaling on older CUDA GPUs, and fp32 elsewhere. On an
AVX512-BF16 CPU a bf16 matmul runs about 3.5x faster than fp32 and a whole LoRA step about 2.5x
(REFERENCE.md); adapter weights and optimizer states stay fp32 either way (autocast only changes the
compute dtype). Asking for bf16 on a CPU without native bf16 warns (PyTorch emulates it, slower than fp32);
fp16 on a CPU is an error.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorakit.config import ConfigError

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    dtype: torch.dtype | None  # autocast dtype (None: no autocast)
    scaler: bool  # fp16: dynamic loss scaling
    why: str = ""  # how it was chosen, for the progress line and the summary

    def autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        if self.dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device.type, dtype=self.dtype)


def cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key (lower case) is one of ``keys``; None where there
    is none (or no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU feature flags that mean native bf16 compute, as /proc/cpuinfo lists them (empty elsewhere)."""
    present = set((cpuinfo("flags", "features") or "").split())
    return tuple(f for f in _CPU_BF16_FLAGS if f in present)


def resolve_precision(mode: str, device: torch.device, cpu_flags: tuple[str, ...] | None = None) -> Precision:
    """The precision ``mode`` ("auto", "bf16", "fp16", "no"/"fp32") means on ``device``; ``cpu_flags``
    overrides the detected CPU bf16 flags (tests)."""
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if mode == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision("bf16", torch.bfloat16, False, "auto: this GPU supports bf16")
            return Precision("fp16", torch.float16, True, "auto: this GPU has no bf16, fp16 with loss scaling")
        if device.type == "cpu" and flags:
            return Precision("bf16", torch.bfloat16, False, f"auto: the CPU computes bf16 natively ({flags[0]})")
        return Precision("fp32", None, False, f"auto: no native bf16 on this {device.type}")
    if mode in ("no", "fp32"):
        return Precision("fp32", None, False, f"training.mixed_precision={mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("training.mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if mode == "bf16":
        if device.type == "cpu" and not flags:
            warnings.warn(
                "training.mixed_precision='bf16': this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag); "
                "PyTorch emulates it, usually slower than fp32 — 'auto' would pick fp32 here",
                stacklevel=2,
            )
        return Precision("bf16", torch.bfloat16, False, "training.mixed_precision='bf16'")
    return Precision("fp16", torch.float16, True, "training.mixed_precision='fp16'")
