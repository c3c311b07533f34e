"""QLoRA merge: dequantize-then-merge is exact; merging back into 4 bits is lossy and says so."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.quant import NF4Linear


def _qlora():
    model = lk.build_model("tiny-llama")
    lk.quantize(model, lk.QuantConfig(compute_dtype=torch.float32))
    lk.inject(model, lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_unload_dequantize_merges_exactly_into_full_precision():
    model = _qlora()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids).logits
    plain = lk.unload(model, merge=True, dequantize=True, dtype=torch.float32)
    assert not any(isinstance(m, (NF4Linear, lk.AdaptedLayer)) for m in plain.modules())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_merge_into_4bit_warns_with_measured_error():
    model = _qlora()
    with pytest.warns(UserWarning, match="mean abs error"):
        lk.merge(model)
    with pytest.raises(lk.AdapterStateError, match="already merged into the 4-bit weights"):
        lk.unload(model, merge=True, dequantize=True)


def test_dequantize_needs_a_quantized_model():
    model = lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(r=2))
    with pytest.raises(lk.ConfigError, match="no lorakit quantized layers"):
        lk.unload(model, dequantize=True)
