"""LoraLinear.forward's paths (fused addmm when dtypes match, cast path otherwise, dropout only in
training) against the equation h = W0 x + (alpha / r) B A x written out."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.lora import LoraLinear


def _adapter(dropout: float = 0.0) -> LoraLinear:
    torch.manual_seed(0)
    ad = LoraLinear(24, 40, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        ad.lora_B.weight.normal_()  # B = 0 at init would hide the update
    return ad


def _equation(ad: LoraLinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    a, b = ad.lora_A.weight.double(), ad.lora_B.weight.double()
    return base_out.double() + ad.scaling * (x.double() @ a.t() @ b.t())


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (24,)])
def test_matching_dtypes_equal_the_equation(shape):
    ad = _adapter().eval()
    x = torch.randn(shape)
    base_out = torch.randn(*shape[:-1], 40)
    y = ad(x, base_out, None)
    assert y.shape == base_out.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _equation(ad, x, base_out), atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_equation():
    ad = _adapter().train()
    x = torch.randn(6, 24, dtype=torch.float64)
    ad.double()
    base_out = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda bo, xx: ad(xx, bo, None), (base_out, x.requires_grad_()))


def test_other_base_dtype_keeps_the_base_dtype():
    ad = _adapter().eval()
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    base_out = torch.randn(5, 40).bfloat16()
    y = ad(x, base_out, None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _equation(ad, x, base_out), atol=6e-2, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ad(x.float(), base_out.float(), None)  # under autocast: no fused fp32 addmm
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), _equation(ad, x, base_out), atol=6e-2, rtol=2e-2)


def test_dropout_only_in_training():
    ad = _adapter(dropout=0.5)
    x, base_out = torch.randn(64, 24), torch.zeros(64, 40)
    ad.eval()
    torch.testing.assert_close(ad(x, base_out, None).double(), _equation(ad, x, base_out), atol=1e-5, rtol=1e-5)
    ad.train()
    torch.manual_seed(1)
    dropped = ad(x, base_out, None)
    torch.manual_seed(1)
    mask_x = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draw, written out
    torch.testing.assert_close(dropped.double(), _equation(ad, mask_x, base_out), atol=1e-5, rtol=1e-5)


def _reference_cast_path(ad: LoraLinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The written-out PEFT order under autocast: x cast to the adapter dtype, then A, B, scale, add."""
    h = torch.nn.functional.linear(x.to(ad.lora_A.weight.dtype), ad.lora_A.weight)
    return base_out + (torch.nn.functional.linear(h, ad.lora_B.weight) * ad.scaling).to(base_out.dtype)


def test_autocast_input_is_not_copied_and_the_result_is_bit_identical():
    """Under bf16 autocast a bf16 input would be cast to fp32 and straight back by the matmul: two copies of
    x, one saved for backward. The layer skips them; outputs and gradients stay bit for bit the same."""
    ad = _adapter().train()
    x = torch.randn(16, 24).bfloat16().requires_grad_()
    base_out = torch.randn(16, 40).bfloat16()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.data_ptr() == x.data_ptr()))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ad(x, base_out, None)
    # what A's matmul keeps for backward is x itself (which the base layer keeps anyway), not a copy
    x_sized = [s for s in saved if s[1] == (16, 24)]
    assert x_sized == [(torch.bfloat16, (16, 24), True)], saved
    y.float().sum().backward()
    grads = [x.grad.clone(), ad.lora_A.weight.grad.clone(), ad.lora_B.weight.grad.clone()]
    x.grad = None
    ad.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_cast_path(ad, x, base_out)
    ref.float().sum().backward()
    assert torch.equal(y, ref)
    for got, want in zip(grads, [x.grad, ad.lora_A.weight.grad, ad.lora_B.weight.grad]):
        assert torch.equal(got, want)
