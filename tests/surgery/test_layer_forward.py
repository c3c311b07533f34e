"""AdaptedLayer.forward builds no objects per call: the weight access is made once per base module."""

from __future__ import annotations

import torch
from torch import nn

import lorakit as lk
import lorakit.surgery.layer as layer_mod


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.q_proj(x)


def test_forward_reuses_one_access_and_follows_a_replaced_base(monkeypatch):
    net = _Net()
    lk.inject(net, lk.AdapterConfig(r=2, alpha=4, target_modules=["q_proj"]))
    layer = net.q_proj
    calls = []
    real = layer_mod.weight_access
    monkeypatch.setattr(layer_mod, "weight_access", lambda m: calls.append(m) or real(m))
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(3):
            net(x)
    assert calls == [] and layer.access is layer.access
    new_base = nn.Linear(16, 16)
    layer.base = new_base  # e.g. a quantized replacement
    with torch.no_grad():
        y = net(x)
    assert calls == [new_base] and layer.access.module is new_base
    ad = layer.adapters[layer.active]
    ref = new_base(x) + ad.scaling * (x @ ad.lora_A.weight.t() @ ad.lora_B.weight.t())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
