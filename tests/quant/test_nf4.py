"""Blockwise NF4/FP4/int8 storage against bitsandbytes (same tensors, same process) and the QLoRA figures."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant import NF4Linear, QuantError, bits_per_param
from lorakit.quant.nf4 import (
    NF4_CODE,
    code_table,
    dequantize_blockwise,
    double_dequantize,
    double_quantize,
    dynamic_map,
    quantize_blockwise,
)


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _weight(shape=(384, 640), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :64] = 0.0  # an all-zero block
    w[1, 5] = 0.9  # an outlier
    return w.to(dtype)


def test_nf4_code_table_is_the_paper_table():
    expected = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.09105, 0.0,
                0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.562617, 0.7229568, 1.0]  # fmt: skip
    assert torch.allclose(code_table("nf4"), torch.tensor(expected), atol=1e-6)
    assert len(NF4_CODE) == 16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_and_absmax_equal_bitsandbytes(quant_type, dtype):
    F = _bnb()
    w = _weight(dtype=dtype)
    codes, absmax = quantize_blockwise(w, blocksize=64, quant_type=quant_type)
    ref_codes, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2
    assert torch.equal(codes, ref_codes.reshape(-1))  # byte for byte, same nibble order
    assert torch.equal(absmax, state.absmax)
    dense = dequantize_blockwise(codes, absmax, 64, quant_type, dtype).reshape(w.shape)
    assert torch.equal(dense, F.dequantize_4bit(ref_codes, state))


def test_4bit_code_table_matches_bitsandbytes():
    F = _bnb()
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_table(qt), F.get_4bit_type(qt, device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


def test_double_quant_within_stated_tolerance_of_bitsandbytes():
    """Stated tolerance. The 4-bit codes are identical; the 8-bit absmax codes are nearest-value
    (ties down) here, while bitsandbytes' CPU search rounds values within ~1.5e-5 of a midpoint either
    way. So: < 1% of absmax codes differ, each by one index; each dequantized absmax differs by at most
    one step of the dynamic map times its block's scale; each weight by at most that (|level| <= 1)."""
    F = _bnb()
    w = _weight((1000, 640), seed=1)  # 10000 absmax constants: 39 full 256-blocks + 1 partial
    codes, absmax = quantize_blockwise(w, 64, "nf4")
    qabs, absmax2, offset = double_quantize(absmax, 256)
    ref_codes, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(codes, ref_codes.reshape(-1))
    assert torch.allclose(offset, state.offset) and torch.equal(absmax2, state.state2.absmax)
    diff = qabs.long() - state.absmax.long()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01
    ours = double_dequantize(qabs, absmax2, offset, 256)
    theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    step = (dynamic_map()[1:] - dynamic_map()[:-1]).max()
    bound = step * absmax2.repeat_interleave(256)[: ours.numel()] + 1e-6
    assert ((ours - theirs).abs() <= bound).all()
    dense = dequantize_blockwise(codes, ours, 64, "nf4").reshape(w.shape)
    ref_dense = F.dequantize_4bit(ref_codes, state)
    assert ((dense - ref_dense).abs() <= bound.repeat_interleave(64).reshape(w.shape)).all()
    assert (dense - ref_dense).abs().mean() < 1e-4


def test_round_trip_4096_and_bits_per_param():
    """QLoRA figures on a 4096x4096 N(0,1) matrix: mean abs error <= 0.0730 (bitsandbytes: 0.0728)
    and <= 4.13 stored bits per parameter with double quantization."""
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    layer = NF4Linear.from_weight(w, quant_type="nf4", blocksize=64, double_quant=True)
    err = (layer.dense_weight(torch.float32) - w).abs()
    assert err.mean() <= 0.0730
    assert err.max() < 0.65
    assert bits_per_param(layer) <= 4.13
    assert bits_per_param(layer) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


def test_bits_per_param_without_double_quant():
    layer = NF4Linear.from_weight(_weight((256, 256)), double_quant=False)
    assert bits_per_param(layer) == pytest.approx(4.5)


def test_int8_round_trip():
    w = _weight()
    codes, absmax = quantize_blockwise(w, 64, "int8")
    assert codes.dtype == torch.int8 and codes.numel() == w.numel()
    dense = dequantize_blockwise(codes, absmax, 64, "int8").reshape(w.shape)
    blocks_absmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(w.shape)
    assert ((dense - w).abs() <= blocks_absmax / 254 + 1e-7).all()  # half a step of absmax/127


def test_zero_tensor_round_trips_to_zero():
    codes, absmax = quantize_blockwise(torch.zeros(128), 64, "nf4")
    assert torch.equal(dequantize_blockwise(codes, absmax, 64, "nf4"), torch.zeros(128))
    q, a2, off = double_quantize(torch.full((10,), 0.5))
    assert torch.allclose(double_dequantize(q, a2, off), torch.full((10,), 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(blocksize=48), "power of two"),
        (dict(blocksize=1), "power of two"),
        (dict(blocksize=128), "does not divide"),
        (dict(quant_type="nf3"), "not supported"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(QuantError, match=message):
        quantize_blockwise(torch.randn(3, 64), **kwargs)


def test_integer_tensor_rejected():
    with pytest.raises(QuantError, match="floating-point"):
        quantize_blockwise(torch.ones(64, dtype=torch.int32))
