"""quantize() on whole models: which layers, the errors, dequantize_model, memory, and QLoRA training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lorakit.config import AdapterConfig, ConfigError, QuantConfig
from lorakit.models import build_model
from lorakit.quant import (
    NF4Linear,
    QuantError,
    bits_per_param,
    dequantize_model,
    eligible_layers,
    quantize,
    quantized_layers,
    storage_bytes,
)

FP32 = QuantConfig(compute_dtype=torch.float32)


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_llama_linears_replaced_head_kept():
    """Logits equal the dense model whose Linear weights are replaced by their dequantized values."""
    m = build_model("tiny-llama", seed=0)
    ref_model = build_model("tiny-llama", seed=0)
    quantize(m, FP32)
    layers = quantized_layers(m)
    assert len(layers) == 2 * 7  # q k v o gate up down per layer
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, NF4Linear)
    with torch.no_grad():
        for name, q in layers.items():
            ref_model.get_submodule(name).weight.copy_(q.dense_weight(torch.float32))
    ids = _ids()
    torch.testing.assert_close(m(ids).logits, ref_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_skip_is_a_suffix_match():
    m = build_model("tiny-llama", seed=0)
    quantize(m, QuantConfig(skip=("lm_head", "down_proj", "self_attn.q_proj")))
    names = set(quantized_layers(m))
    assert not any(n.endswith(("down_proj", "q_proj")) for n in names)
    assert "model.layers.0.self_attn.k_proj" in names


def test_gpt2_conv1d_is_quantized_with_the_same_output():
    m = build_model("tiny-gpt2", seed=0)
    conv = m.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 3, 64)
    dense = conv(x)
    quantize(m, FP32)
    q = m.transformer.h[0].mlp.c_fc
    assert isinstance(q, NF4Linear) and (q.in_features, q.out_features) == (64, 256)
    w = q.dense_weight(torch.float32)
    torch.testing.assert_close(w, NF4Linear.from_weight(conv.weight.t()).dense_weight(torch.float32))
    assert (q(x) - dense).abs().max() < 0.2 * dense.abs().max()


def test_bert_classifier_head_and_modules_argument():
    m = build_model("tiny-bert", task="classification", seed=0)
    quantize(m, FP32)
    assert isinstance(m.classifier, nn.Linear) and not isinstance(m.classifier, NF4Linear)
    m2 = build_model("tiny-llama", seed=0)
    quantize(m2, FP32, modules=["model.layers.0.mlp.up_proj"])
    assert list(quantized_layers(m2)) == ["model.layers.0.mlp.up_proj"]


def test_errors():
    m = build_model("tiny-llama", seed=0)
    quantize(m, FP32)
    with pytest.raises(QuantError, match="already quantized"):
        quantize(m, FP32)
    with pytest.raises(QuantError, match="no eligible"):
        quantize(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), FP32)
    with pytest.raises(QuantError, match="no eligible"):
        quantize(nn.Sequential(nn.Linear(64, 64)), QuantConfig(skip=("0",)))
    fresh = build_model("tiny-llama", seed=0)
    with pytest.raises(QuantError, match="not a Linear"):
        quantize(fresh, FP32, modules=["model.norm"])
    with pytest.raises(QuantError, match="no module named"):
        quantize(fresh, FP32, modules=["model.nope"])
    with pytest.raises(QuantError, match=r"layer 'model.layers.0.self_attn.q_proj'.*does not divide"):
        quantize(fresh, QuantConfig(blocksize=8192))
    assert not quantized_layers(fresh)  # checked before any layer was replaced
    with pytest.raises(ConfigError, match="power of two"):
        QuantConfig(blocksize=48)
    with pytest.raises(ConfigError, match="dtype"):
        QuantConfig(dtype="nf3")
    bad = dataclasses.replace(FP32)
    object.__setattr__(bad, "dtype", "nf3")  # bypassing the config's own validation
    with pytest.raises(QuantError, match="nf3"):
        eligible_layers(fresh, bad)


def test_dequantize_model_gives_plain_linears():
    m = build_model("tiny-llama", seed=0)
    quantize(m, FP32)
    ids = _ids()
    q_logits = m(ids).logits
    dequantize_model(m, torch.float32)
    assert not quantized_layers(m)
    assert isinstance(m.model.layers[0].mlp.up_proj, nn.Linear)
    torch.testing.assert_close(m(ids).logits, q_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(QuantError, match="no lorakit quantized"):
        dequantize_model(m)


def test_storage_bytes_and_bits():
    m = build_model("tiny-llama", seed=0)
    before = storage_bytes(m)
    assert before == sum(p.numel() * 4 for p in m.parameters()) + sum(b.nbytes for b in m.buffers())
    quantize(m, QuantConfig())
    layers = quantized_layers(m).values()
    linear_params = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172)
    assert sum(q.spec.numel for q in layers) == linear_params
    stored = sum(q.weight_storage_bytes() for q in layers)
    assert storage_bytes(m) == before - 4 * linear_params + stored
    assert bits_per_param(m) == pytest.approx(8 * stored / linear_params)
    # small layers pay for partial second-level blocks; 4096x4096 reaches 4.127 (test_nf4.py)
    assert 4.127 < bits_per_param(m) < 4.14


def test_qlora_training_decreases_loss_and_trains_only_adapters():
    inject = pytest.importorskip("lorakit.surgery.inject").inject

    torch.manual_seed(0)
    m = build_model("tiny-llama", seed=0)
    quantize(m, QuantConfig())  # bf16 compute, as in QLoRA
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    inject(m, AdapterConfig(r=8, alpha=16, target_modules="all-linear"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(shape=(4, 24))
    losses = []
    for _ in range(8):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
        assert all(m.get_parameter(n).grad is not None for n in trainable if ".lora_A" in n or "lora_B" in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    state = m.state_dict()
    for name, layer in quantized_layers(m).items():
        prefix = name[: -len(".base")] if name.endswith(".base") else name
        key = f"{prefix}.qweight"
        assert torch.equal(layer.qweight, frozen[key]), key
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items())
