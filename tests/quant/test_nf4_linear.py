"""NF4Linear: forward/backward equal the dense equation with the dequantized weight; frozen; serialisable."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit.quant.linear as qlinear
from lorakit.quant import NF4Linear, QuantError
from lorakit.weights import weight_access


def _dense(out_f=48, in_f=96, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.bias.uniform_(-1, 1) if bias else None
    return lin


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_forward_backward_equal_dense_reference(quant_type, double_quant):
    lin = _dense()
    q = NF4Linear.from_linear(
        lin, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32
    )
    w = q.dense_weight(torch.float32)  # (out, in)
    assert w.shape == (48, 96) and (w - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = q(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.t() + lin.bias.detach()  # the equation, written out
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_bf16_compute_and_output_dtype_follows_input():
    lin = _dense()
    q = NF4Linear.from_linear(lin)  # default compute bf16
    w = q.dense_weight()
    assert w.dtype == torch.bfloat16
    x = torch.randn(3, 96)
    y = q(x)
    assert y.dtype == torch.float32
    ref = (x.bfloat16() @ w.t() + lin.bias.detach().bfloat16()).float()
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    assert q(x.double()).dtype == torch.float64
    assert q(torch.randn(96)).shape == (48,)  # any leading shape, including none


def test_chunked_path_equals_single_chunk(monkeypatch):
    """in_features=96 is not a multiple of the block: chunks start mid-block and must still agree."""
    q = NF4Linear.from_linear(_dense(out_f=50), compute_dtype=torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    y_one = q(x)
    (g_one,) = torch.autograd.grad(y_one.sum(), x)
    monkeypatch.setattr(qlinear, "CHUNK_ELEMENTS", 200)  # 2 rows (192 elements) per chunk
    assert len(list(qlinear._row_chunks(q.spec))) == 25
    y_chunked = q(x)
    (g_chunked,) = torch.autograd.grad(y_chunked.sum(), x)
    torch.testing.assert_close(y_chunked, y_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_chunked, g_one, atol=1e-5, rtol=1e-5)


def test_no_dense_weight_kept_for_backward():
    q = NF4Linear.from_linear(_dense(out_f=128, in_f=128))
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert not any(dt.is_floating_point and n >= 128 * 128 for dt, n in saved), saved
    y.sum().backward()
    assert x.grad is not None


def test_quantized_weight_never_trains():
    q = NF4Linear.from_linear(_dense())
    before = {k: v.clone() for k, v in q.state_dict().items()}
    assert [p for p in q.parameters() if p.requires_grad] == []
    x = torch.randn(3, 96, requires_grad=True)
    q(x).sum().backward()
    assert all(b.grad is None for b in q.buffers())
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(QuantError, match="frozen"):
        q.weight.requires_grad_(True)
    with pytest.raises(QuantError, match="frozen"):
        q.weight.requires_grad = True
    with pytest.raises(QuantError, match="frozen"):
        q.requires_grad_(True)
    with pytest.raises(QuantError, match="set_dense_weight"):
        q.weight = nn.Parameter(torch.zeros(48, 96))
    q.requires_grad_(False)  # freezing is fine
    assert q.weight.shape == (48, 96) and not q.weight.requires_grad


def test_state_dict_round_trips_through_safetensors(tmp_path):
    q = NF4Linear.from_linear(_dense(), compute_dtype=torch.float32)
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    fresh = NF4Linear(96, 48, compute_dtype=torch.float32)
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), q(x))
    assert sorted(q.state_dict()) == ["absmax", "absmax2", "absmax_offset", "bias", "qweight"]


def test_weight_access_sees_a_quantized_linear():
    q = NF4Linear.from_linear(_dense(), compute_dtype=torch.float32)
    acc = weight_access(q)
    assert acc.quantized and acc.kind == "linear" and (acc.in_features, acc.out_features) == (96, 48)
    assert acc.dtype == torch.float32
    assert torch.equal(acc.dense_weight(), q.dense_weight(torch.float32))


def test_set_dense_weight_requantizes_and_reports_error():
    q = NF4Linear.from_linear(_dense(), compute_dtype=torch.float32)
    target = torch.randn(48, 96) * 0.1
    with pytest.warns(UserWarning, match="mean abs error"):
        err = q.set_dense_weight(target)
    assert err == pytest.approx(float((q.dense_weight(torch.float32) - target).abs().mean()))
    expected = NF4Linear.from_weight(target, compute_dtype=torch.float32)
    assert torch.equal(q.qweight, expected.qweight) and torch.equal(q.absmax, expected.absmax)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.set_dense_weight(target, warn=False)
    with pytest.raises(QuantError, match="shape"):
        q.set_dense_weight(torch.zeros(96, 48))
    with pytest.raises(QuantError, match="NaN"):
        q.set_dense_weight(torch.full((48, 96), float("nan")))


def test_dtype_casts_keep_scales_in_fp32():
    q = NF4Linear.from_linear(_dense(), compute_dtype=torch.float32)
    x = torch.randn(2, 96)
    ref = q(x)
    q.to(torch.bfloat16)
    assert q.absmax2.dtype == torch.float32 and q.absmax_offset.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    torch.testing.assert_close(q(x), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NF4Linear(96, 48, blocksize=96), "power of two"),
        (lambda: NF4Linear(3, 5, blocksize=64), "does not divide"),
        (lambda: NF4Linear(96, 48, quant_type="int4"), "not supported"),
        (lambda: NF4Linear.from_weight(torch.zeros(2, 3, 64)), "2-D"),
    ],
)
def test_bad_layers(make, message):
    with pytest.raises(QuantError, match=message):
        make()


def test_wrong_input_width():
    with pytest.raises(QuantError, match="in_features"):
        NF4Linear.from_linear(_dense())(torch.randn(2, 95))
