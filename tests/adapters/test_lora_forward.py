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
