"""Each bad input gives a clear ValueError-family error and leaves the model exactly as it was."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.io import AdapterFileError, AdapterNotFoundError, load_adapter, save_adapter
from lorakit.state import peek_state
from lorakit.surgery.layer import AdaptedLayer, TrainedCopy


def build(name="tiny-llama", **kw):
    return lk.build_model(name, **kw).float()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A good lorakit adapter on tiny-llama (q_proj, v_proj, r=4, non-zero B)."""
    path = tmp_path_factory.mktemp("good")
    model = lk.inject(build(), lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapter(model, path)
    return path


def copy_adapter(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def fingerprint(model):
    """Everything a failed load could change."""
    return (
        {n: type(m).__name__ for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        repr(peek_state(model)),
    )


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k
    assert before[2:] == after[2:]


@pytest.fixture(params=["plain", "with-adapter"])
def model(request, adapter_dir):
    """A plain base, or one already holding an active adapter 'first' (which must stay active)."""
    m = build()
    if request.param == "with-adapter":
        load_adapter(m, adapter_dir, adapter_name="first")
    return m


def check_fails(model, path, error, match, adapter_name="default"):
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        load_adapter(model, path, adapter_name=adapter_name)
    assert_same(before, fingerprint(model))


def test_missing_directory_is_an_error_not_a_hub_lookup(model, tmp_path):
    check_fails(model, tmp_path / "nope", AdapterNotFoundError, "does not exist")
    check_fails(model, "someone/some-adapter", AdapterNotFoundError, "never downloads")
    assert issubclass(AdapterNotFoundError, ValueError) and issubclass(
        AdapterNotFoundError, FileNotFoundError
    )


def test_directory_without_the_files(model, adapter_dir, tmp_path):
    check_fails(model, tmp_path, AdapterNotFoundError, "no adapter_config.json")
    d = copy_adapter(adapter_dir, tmp_path / "noweights")
    os.remove(d / "adapter_model.safetensors")
    check_fails(model, d, AdapterNotFoundError, "no adapter_model.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupted_safetensors(model, adapter_dir, tmp_path, damage):
    d = copy_adapter(adapter_dir, tmp_path / "bad")
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    check_fails(model, d, AdapterFileError, "not a readable safetensors file")


def test_nan_tensor_is_refused(model, adapter_dir, tmp_path):
    d = copy_adapter(adapter_dir, tmp_path / "nan")
    tensors = load_file(d / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, d / "adapter_model.safetensors")
    check_fails(model, d, AdapterFileError, "NaN or infinite")


def test_adapter_for_another_base_names_layer_and_shapes(model, adapter_dir):
    other = lk.build_model("tiny-llama")
    other_path = os.path.join(os.path.dirname(adapter_dir), "other-base")
    # the same architecture with a narrower hidden size: same keys, different shapes
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=260,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    save_adapter(lk.inject(small, lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"])), other_path)
    del other
    check_fails(
        model,
        other_path,
        AdapterFileError,
        r"layer 'model.layers.0.self_attn.q_proj': .*lora_A.weight: shape \(4, 32\) does not match the "
        r"model's \(4, 64\)",
    )


def test_missing_and_unexpected_keys(model, adapter_dir, tmp_path):
    d = copy_adapter(adapter_dir, tmp_path / "missing")
    tensors = load_file(d / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, d / "adapter_model.safetensors")
    check_fails(
        model, d, AdapterFileError, r"1 tensors .* missing: 'base_model.model.model.layers.1.self_attn.v_proj"
    )
    d = copy_adapter(adapter_dir, tmp_path / "extra")
    tensors = load_file(d / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / "adapter_model.safetensors")
    check_fails(model, d, AdapterFileError, r"1 unexpected tensors .*mlp.up_proj.lora_A.weight")
    d = copy_adapter(adapter_dir, tmp_path / "noprefix")
    save_file({"q_proj.lora_A.weight": torch.zeros(4, 64)}, d / "adapter_model.safetensors")
    check_fails(model, d, AdapterFileError, "does not start with 'base_model.model.'")


def edit_config(adapter_dir, tmp_path, **changes):
    d = copy_adapter(adapter_dir, tmp_path / "cfg")
    data = json.loads((d / "adapter_config.json").read_text())
    data.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(peft_type="IA3"), r"peft_type='IA3' is not supported; lorakit reads \['ADALORA', 'LORA'\]"),
        (dict(r=0), r"adapter_config.json: r=0 is invalid"),
        (dict(bias="all"), r"bias='all' is not supported"),
        (dict(lora_bias=True), r"lora_bias=True is a PEFT feature lorakit does not support"),
        (dict(target_modules=7), r"target_modules=7 has the wrong type"),
        (dict(use_rslora="yes"), r"use_rslora='yes' has the wrong type"),
        (dict(init_lora_weights="loftq"), r"init_lora_weights='loftq' is not supported"),
        (dict(target_modules=["nothing_like_this"]), r"matched no module"),
    ],
)
def test_bad_config_fields(model, adapter_dir, tmp_path, changes, match):
    check_fails(model, edit_config(adapter_dir, tmp_path, **changes), ValueError, match)


def test_invalid_json(model, adapter_dir, tmp_path):
    d = copy_adapter(adapter_dir, tmp_path / "json")
    (d / "adapter_config.json").write_text("{ not json")
    check_fails(model, d, AdapterFileError, "not valid JSON")


@pytest.mark.parametrize("bad", ["a/b", "../x", "a.b", ""])
def test_adapter_name_with_path_separator(model, adapter_dir, bad):
    check_fails(model, adapter_dir, lk.ConfigError, "adapter_name", adapter_name=bad)


def test_same_name_twice(adapter_dir):
    model = load_adapter(build(), adapter_dir)
    check_fails(model, adapter_dir, lk.AdapterStateError, "already in the model")


def test_failure_after_injection_removes_the_half_loaded_adapter(adapter_dir, tmp_path, monkeypatch):
    """A failure inside load_peft_state (after the wrappers are in place) is rolled back too."""
    from lorakit.adapters import lora

    def boom(self, state):
        raise RuntimeError("disk on fire")

    model = build(name="tiny-bert", task="classification")
    m = lk.inject(
        build(name="tiny-bert", task="classification"),
        lk.AdapterConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
    )
    save_adapter(m, tmp_path / "bert")
    before = fingerprint(model)
    monkeypatch.setattr(lora.LoraLinear, "load_peft_state", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_adapter(model, tmp_path / "bert")
    assert_same(before, fingerprint(model))
    assert not any(isinstance(x, (AdaptedLayer, TrainedCopy)) for x in model.modules())


def test_failed_pissa_load_restores_the_base_weights(tmp_path):
    """PiSSA rewrites the base weights when injected; a failed load must put them back."""
    m = lk.inject(build(), lk.AdapterConfig(init="pissa", r=2, target_modules=["q_proj"]))
    save_adapter(m, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    check_fails(build(), tmp_path, AdapterFileError, "missing")
