"""An optional compiled kernel for 4-bit dequantization: bitsandbytes' ``dequantize_4bit`` op.

lorakit's NF4 / FP4 storage is bitsandbytes' layout byte for byte (``lorakit.quant.nf4``), and its
dequantization rounds level * absmax once from fp32 into the compute dtype, as bitsandbytes' kernels do,
so the op gives the same tensor bit for bit (tests/quant/test_nf4_dequant.py) -- about 3x faster on CPU than
the PyTorch passes in ``nf4.dequantize_blockwise``, which remain the reference and the fallback.

Used when bitsandbytes is installed (it is optional: ``pip install bitsandbytes``), the op accepts the
tensors' device and the call is not traced by ``torch.compile``; ``LORAKIT_NF4_KERNEL=torch`` turns it off.
Nothing is imported until the first 4-bit dequantization, and bitsandbytes' notice about its optional
``kernels`` package is kept out of the log.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch

ENV = "LORAKIT_NF4_KERNEL"  # "torch": always use lorakit's PyTorch dequantization
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSET = object()
_op: object = _UNSET


def _load() -> Callable | None:
    if os.environ.get(ENV, "").strip().lower() == "torch" or importlib.util.find_spec("bitsandbytes") is None:
        return None
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward from kernels-community": not ours
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        return torch.ops.bitsandbytes.dequantize_4bit.default
    except Exception:  # a broken or incompatible install: the PyTorch path is always right
        return None
    finally:
        log.setLevel(level)


def dequantize_4bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, numel: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """``numel`` values (flat, ``dtype``) from packed 4-bit ``codes`` and fp32 per-block ``absmax``, by the
    compiled op; None when there is none for these tensors (the caller then dequantizes itself)."""
    global _op
    if torch.compiler.is_compiling():
        # traced by torch.compile: bitsandbytes' CPU kernel returns another shape than its registered fake
        # tensor says (inductor's size check fails), and the PyTorch passes compile into one fused loop anyway
        return None
    if dtype not in _DTYPES or codes.device.type not in ("cpu", "cuda") or absmax.dtype != torch.float32:
        return None
    if _op is _UNSET:
        _op = _load()
    if _op is None:
        return None
    try:
        out = _op(codes.reshape(-1, 1), absmax, blocksize, quant_type, [numel], dtype)
    except (RuntimeError, NotImplementedError):  # no kernel for this device / build
        return None
    return out.view(-1)
