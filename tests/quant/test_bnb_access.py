"""Weight access for bitsandbytes Linear4bit: adapters see its dense weight like any other base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit.quant  # noqa: F401  (registers the bitsandbytes access)
from lorakit.quant import QuantError, quantize, storage_bytes
from lorakit.quant.bnb import BnbWeightAccess, is_bnb_4bit
from lorakit.weights import weight_access

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


def _layer(quantized=True):
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    return (layer.to("cpu") if quantized else layer), dense


def test_dense_weight_is_bitsandbytes_dequantize():
    layer, dense = _layer()
    acc = weight_access(layer)
    assert isinstance(acc, BnbWeightAccess) and acc.quantized and acc.kind == "linear"
    assert (acc.in_features, acc.out_features) == (128, 64) and acc.dtype == torch.float32
    w = acc.dense_weight(torch.float32)
    assert torch.equal(w, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert (w - dense.weight).abs().max() < 0.2 * dense.weight.abs().max()


def test_dense_weight_after_cpu_repacking():
    """On AVX512-BF16 CPUs the first eval forward repacks the weight; dense_weight unpacks a copy."""
    layer, _ = _layer()
    before = weight_access(layer).dense_weight(torch.float32)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    after = weight_access(layer).dense_weight(torch.float32)
    assert (after - before).abs().max() < 1e-3  # bf16 rounding of the scales when repacked


def test_not_yet_quantized_is_a_clear_error():
    layer, _ = _layer(quantized=False)
    with pytest.raises(QuantError, match="not quantized yet"):
        weight_access(layer).dense_weight()


def test_set_dense_weight_requantizes():
    layer, _ = _layer()
    target = torch.randn(64, 128) * 0.05
    with pytest.warns(UserWarning, match="mean abs error"):
        weight_access(layer).set_dense_weight(target)
    ref, state = F.quantize_4bit(target, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight.data, ref)
    with pytest.raises(QuantError, match="shape"):
        weight_access(layer).set_dense_weight(torch.zeros(128, 64))


def test_bnb_model_is_already_quantized_and_counted():
    layer, _ = _layer()
    assert is_bnb_4bit(layer) and not is_bnb_4bit(nn.Linear(2, 2))
    with pytest.raises(QuantError, match="already quantized"):
        quantize(nn.Sequential(layer, nn.Linear(64, 64)))
    qs = layer.weight.quant_state
    expected = (
        layer.weight.numel() + layer.bias.numel() * 4 + qs.absmax.numel() + qs.state2.absmax.numel() * 4 + 4
    )
    assert storage_bytes(layer) == expected


def test_lora_sits_on_a_bitsandbytes_layer():
    inject = pytest.importorskip("lorakit.surgery.inject").inject
    from lorakit.config import AdapterConfig

    layer, _ = _layer()
    model = nn.Sequential(layer)
    inject(model, AdapterConfig(r=4, target_modules=["0"], init="gaussian"))
    x = torch.randn(3, 128)
    base = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    model(x).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"0.adapters.default.lora_A.weight", "0.adapters.default.lora_B.weight"}
    with torch.no_grad():  # B = 0 at init: the adapted layer equals the base
        torch.testing.assert_close(model(x), x @ base.t() + layer.bias, atol=1e-4, rtol=1e-4)
