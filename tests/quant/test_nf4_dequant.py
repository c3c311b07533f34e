"""The fast dequantization path (byte -> level-pair table, cache-sized passes, straight into the compute
dtype) against the definition written out element by element."""

from __future__ import annotations

import pytest
import torch

import lorakit.quant.nf4 as nf4
from lorakit.quant import NF4Linear, kernel
from lorakit.quant.nf4 import code_table, dequantize_blockwise, quantize_blockwise


def _weight(shape=(96, 160), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :64] = 0.0  # an all-zero block
    w[1, 5] = 0.9  # an outlier
    return w


def _reference(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """The definition: element 2i is the high nibble of byte i, 2i+1 the low one; w = level * absmax (fp32)."""
    if quant_type == "int8":
        levels = codes.float() * (1.0 / 127.0)
    else:
        nibbles = torch.stack([codes.long() >> 4, codes.long() & 15], dim=1).reshape(-1)
        levels = code_table(quant_type)[nibbles]
    return (levels.reshape(-1, blocksize) * absmax.unsqueeze(1)).reshape(-1)


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    """Each test below runs on lorakit's PyTorch passes and on bitsandbytes' compiled op (when installed)."""
    if request.param == "torch":
        monkeypatch.setattr(kernel, "_op", None)
    else:
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr(kernel, "_op", kernel._UNSET)
        codes, absmax = quantize_blockwise(_weight(), 64, "nf4")
        assert kernel.dequantize_4bit(codes, absmax, 64, "nf4", codes.numel() * 2, torch.bfloat16) is not None
    return request.param


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("pass_bytes", [nf4.CPU_PASS_BYTES, 96, 1])
def test_dequantize_equals_the_definition_in_every_dtype(monkeypatch, path, quant_type, pass_bytes):
    """fp32 equals the definition exactly; bf16/fp16 equal it rounded once (bit for bit), also when the
    work is cut into passes that do not divide the tensor (96 bytes: 3 nf4 blocks; 1: a block per pass),
    on both paths (the compiled op must give the same bits)."""
    monkeypatch.setattr(nf4, "CPU_PASS_BYTES", pass_bytes)
    codes, absmax = quantize_blockwise(_weight(), 64, quant_type)
    ref = _reference(codes, absmax, 64, quant_type)
    assert torch.equal(dequantize_blockwise(codes, absmax, 64, quant_type), ref)
    for dtype in (torch.bfloat16, torch.float16):
        got = dequantize_blockwise(codes, absmax, 64, quant_type, dtype)
        assert got.dtype == dtype and torch.equal(got, ref.to(dtype)), dtype


def test_dequantize_into_a_given_buffer():
    codes, absmax = quantize_blockwise(_weight(), 64, "nf4")
    buf = torch.full((codes.numel() * 2,), float("nan"), dtype=torch.bfloat16)
    got = dequantize_blockwise(codes, absmax, 64, "nf4", torch.bfloat16, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, _reference(codes, absmax, 64, "nf4").bfloat16())


def test_layer_weight_in_compute_dtype_is_the_fp32_weight_rounded_once(path):
    """NF4Linear.dense_weight(bf16) -- what forward and backward multiply with -- is the fp32 dequantized
    weight cast to bf16, bit for bit, with rows that straddle blocks (in_features 96 is not a multiple of 64)."""
    q = NF4Linear.from_weight(_weight((50, 96)))
    w32 = q.dense_weight(torch.float32)
    assert torch.equal(q.dense_weight(torch.bfloat16), w32.bfloat16())
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(q.matmul(x), x @ w32.bfloat16().t(), atol=0, rtol=0)
