"""load_quantized streams safetensors into a quantized skeleton: same model as quantize(from_pretrained)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorakit.config import QuantConfig
from lorakit.models import build_model
from lorakit.quant import QuantError, load_quantized, quantize, quantized_layers
from lorakit.quant.loading import _params_on_meta

transformers = pytest.importorskip("transformers")
FP32 = QuantConfig(compute_dtype=torch.float32)


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _assert_same(loaded: nn.Module, reference: nn.Module) -> None:
    a, b = loaded.state_dict(), reference.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(loaded(_ids()).logits, reference(_ids()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_llama_same_logits_as_quantize_after_from_pretrained(tmp_path, shard_size):
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    build_model("tiny-llama", seed=0).save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    reference = quantize(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), FP32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexpected, nothing missing
        loaded = load_quantized(tmp_path, FP32)
    assert not loaded.training
    assert not [n for n, p in loaded.named_parameters() if p.device.type == "meta"]
    assert len(quantized_layers(loaded)) == 14
    _assert_same(loaded, reference.eval())


def test_gpt2_tied_head_and_conv1d(tmp_path):
    build_model("tiny-gpt2", seed=0).save_pretrained(tmp_path, safe_serialization=True)
    reference = quantize(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), FP32
    )
    loaded = load_quantized(tmp_path, FP32)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied, not a copy
    _assert_same(loaded, reference.eval())


def test_classification_head_is_initialised_and_kept_dense(tmp_path):
    build_model("tiny-bert", task="base", seed=0).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning, match="newly initialised head"):
        model = load_quantized(tmp_path, FP32, task="classification", num_labels=3)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 3
    assert torch.isfinite(model.classifier.weight).all() and model.classifier.weight.abs().sum() > 0
    ids = _ids()
    assert model(input_ids=ids).logits.shape == (2, 3)


def test_params_on_meta_keeps_buffers_real():
    with _params_on_meta():
        layer = nn.BatchNorm1d(4)
    assert layer.weight.device.type == "meta" and layer.running_mean.device.type == "cpu"
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # patch removed afterwards


def test_bad_directories(tmp_path):
    with pytest.raises(QuantError, match="not a directory"):
        load_quantized(tmp_path / "missing", FP32)
    with pytest.raises(QuantError, match="config.json"):
        load_quantized(tmp_path, FP32)
    m = build_model("tiny-llama", seed=0)
    m.config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(QuantError, match=r"no \*\.safetensors"):
        load_quantized(tmp_path, FP32)
    m.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(QuantError, match="task="):
        load_quantized(tmp_path, FP32, task="seq2seq")
    with pytest.raises(QuantError, match="does not divide"):
        load_quantized(tmp_path, QuantConfig(blocksize=8192))


def test_truncated_checkpoint_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    build_model("tiny-llama", seed=0).save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.input_layernorm.weight"]
    del state["model.layers.0.mlp.up_proj.weight"]  # a quantized layer's weight
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantError, match=r"lacks 2 model tensors.*up_proj.weight"):
        load_quantized(tmp_path, FP32)


def test_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from lorakit.quant.loading import iter_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    ours = dict(iter_safetensors(tmp_path / "t.safetensors"))
    ref = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(QuantError, match="not a valid safetensors"):
        list(iter_safetensors(tmp_path / "bad.safetensors"))
