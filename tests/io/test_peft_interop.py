"""Adapter files against the peer: PEFT writes -> lorakit reads, lorakit writes -> PEFT reads.

Every comparison runs both libraries on the same weights in fp32 and compares logits (1e-5).
"""

import copy
import json
import os
import warnings

import pytest
import torch

import lorakit as lk
from helpers import logits_of
from lorakit.io import (
    adapter_state,
    config_from_peft,
    config_to_peft,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lorakit.io.peft_format import _CODECS, register_peft_type
from lorakit.state import state_of
from lorakit.surgery.inject import adapted_layers

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])

CASES = {
    # name: (model, task, PEFT config)
    "llama-patterns-embedding": (
        "tiny-llama",
        "causal-lm",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
            task_type="CAUSAL_LM",
        ),
    ),
    "gpt2-conv1d-rslora": (
        "tiny-gpt2",
        "causal-lm",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_rslora=True,
            task_type="CAUSAL_LM",
        ),
    ),
    "bert-classifier": (
        "tiny-bert",
        "classification",
        dict(
            r=4,
            lora_alpha=16,
            target_modules="bert.encoder.layer.1.attention.self.(query|value)",
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
}


def model_of(name, task, seed=0):
    return lk.build_model(name, task=task, seed=seed).float()


def randomize(params, seed=1):
    """Non-zero B (and A) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_model(case, seed=1):
    name, task, kwargs = CASES[case]
    kwargs = copy.deepcopy(kwargs)  # PEFT appends to modules_to_save in place
    pm = peft.get_peft_model(model_of(name, task), peft.LoraConfig(**kwargs))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n or "modules_to_save" in n], seed)
    return pm.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_lorakit_logits_match(case, tmp_path):
    pm = peft_model(case)
    with torch.no_grad():
        ref = logits_of(pm(X))
    pm.save_pretrained(tmp_path)
    name, task, _ = CASES[case]
    model = load_adapter(model_of(name, task), tmp_path)
    with torch.no_grad():
        out = logits_of(model(X))
        base = logits_of(model_of(name, task)(X))
    assert (ref - base).abs().max() > 1e-3  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_to_peft_logits_match(case, tmp_path):
    name, task, kwargs = CASES[case]
    cfg = lk.AdapterConfig(
        r=kwargs["r"],
        alpha=kwargs["lora_alpha"],
        target_modules=kwargs["target_modules"],
        use_rslora=kwargs.get("use_rslora", False),
        rank_pattern=kwargs.get("rank_pattern", {}),
        alpha_pattern=kwargs.get("alpha_pattern", {}),
        modules_to_save=kwargs.get("modules_to_save", ()),
    )
    model = lk.inject(model_of(name, task), cfg)
    randomize([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        ref = logits_of(model(X))
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(model_of(name, task), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pm(X)), ref, rtol=1e-5, atol=1e-5)


def test_all_linear_targets_are_written_explicitly_for_peft(tmp_path):
    model = lk.inject(
        model_of("tiny-llama", "causal-lm"),
        lk.AdapterConfig(r=2, target_modules="all-linear", layers_to_transform=[1]),
    )
    randomize([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        ref = logits_of(model(X))
    save_adapter(model, tmp_path)
    cfg, _, _ = read_adapter(tmp_path)
    assert sorted(cfg.target_modules) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    pm = peft.PeftModel.from_pretrained(model_of("tiny-llama", "causal-lm"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pm(X)), ref, rtol=1e-5, atol=1e-5)


def test_named_adapters_use_peft_subfolders(tmp_path):
    pm = peft_model("llama-patterns-embedding")
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize([p for n, p in pm.named_parameters() if ".second." in n], seed=5)
    pm.set_adapter("second")
    with torch.no_grad():
        ref_second = logits_of(pm(X))
    pm.save_pretrained(tmp_path, selected_adapters=["default", "second"])
    assert os.path.isfile(tmp_path / "second" / "adapter_config.json")
    model = load_adapter(model_of("tiny-llama", "causal-lm"), tmp_path)
    load_adapter(model, tmp_path, adapter_name="second")
    assert lk.active_adapter(model) == "second"
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(X)), ref_second, rtol=1e-5, atol=1e-5)
    out = save_adapter(model, tmp_path / "mine", adapter_name="second")
    assert out == os.path.join(tmp_path / "mine", "second")
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_file_holds_only_adapter_tensors(tmp_path):
    model = lk.inject(
        model_of("tiny-bert", "classification"),
        lk.AdapterConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    save_adapter(model, tmp_path)
    state = adapter_state(model)
    expected_bytes = sum(t.numel() * t.element_size() for t in state.values())
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert expected_bytes < size < expected_bytes + 8192  # tensors + a small JSON header
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if ".adapters." not in n
    )
    assert size < base_bytes / 10
    assert sorted(k.rsplit(".", 2)[-2] for k in state if "classifier" in k) == ["classifier", "classifier"]


def test_legacy_bin_is_read_with_weights_only_and_a_warning(tmp_path):
    pm = peft_model("gpt2-conv1d-rslora")
    with torch.no_grad():
        ref = logits_of(pm(X))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="weights_only=True"):
        model = load_adapter(model_of("tiny-gpt2", "causal-lm"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(X)), ref, rtol=1e-5, atol=1e-5)


def test_config_json_round_trip_keeps_every_field():
    model = lk.build_model("tiny-llama")
    cfg = lk.AdapterConfig(
        r=6,
        alpha=12.0,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["layers.0.self_attn.v_proj"],
        layers_to_transform=(0, 1),
        layers_pattern="layers",
        rank_pattern={"q_proj": 3},
        alpha_pattern={"v_proj": 5.0},
        use_rslora=True,
        init="gaussian",
    )
    lk.inject(model, cfg)
    data = config_to_peft(cfg, model, "default", task_type="CAUSAL_LM", base_model_name_or_path="x/y")
    assert data["peft_type"] == "LORA" and data["init_lora_weights"] == "gaussian"
    back, meta = config_from_peft(data)
    assert back == cfg
    assert meta == {"task_type": "CAUSAL_LM", "base_model_name_or_path": "x/y"}
    peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})  # PEFT accepts every field


def test_adalora_json_maps_fields_and_masks():
    mask = [True, False, True, False, False, False]
    data = {
        "peft_type": "ADALORA",
        "init_r": 6,
        "target_r": 2,
        "lora_alpha": 8,
        "deltaT": 3,
        "total_step": 50,
        "target_modules": ["q_proj"],
        "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": mask},
    }
    cfg, meta = config_from_peft(data)
    assert (cfg.method, cfg.init_r, cfg.target_r, cfg.delta_t, cfg.total_step) == ("adalora", 6, 2, 3, 50)
    assert cfg.rank_pattern == {}  # the masks are not rank overrides ...
    assert meta["layer_kwargs"] == {
        "model.layers.0.self_attn.q_proj": {"rank_mask": mask}
    }  # ... they go here
    data["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, 1]}
    with pytest.raises(lk.ConfigError, match="must be a list of booleans"):
        config_from_peft(data)
    data["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True]}
    with pytest.raises(lk.ConfigError, match="has 1 entries; expected init_r=6"):
        config_from_peft(data)


def test_peft_adalora_with_pruned_ranks_to_lorakit_and_back(tmp_path):
    cfg = peft.AdaLoraConfig(
        init_r=4, target_r=2, deltaT=1, total_step=4, target_modules=["q_proj", "v_proj"]
    )
    pm = peft.get_peft_model(model_of("tiny-llama", "causal-lm"), cfg)
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.01)
    for step in range(1, 5):  # PEFT's budget loop: prunes ranks and records the masks in rank_pattern
        pm(input_ids=X, labels=X).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    masks = pm.peft_config["default"].rank_pattern
    assert any(not all(m) for m in masks.values())
    with torch.no_grad():
        ref = logits_of(pm.eval()(X))
    pm.save_pretrained(tmp_path / "peft")
    model = load_adapter(model_of("tiny-llama", "causal-lm"), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(X)), ref, rtol=1e-5, atol=1e-5)
    save_adapter(model, tmp_path / "mine")
    back = peft.PeftModel.from_pretrained(model_of("tiny-llama", "causal-lm"), tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(back(X)), ref, rtol=1e-5, atol=1e-5)


def test_peft_type_codec_registry_hook():
    def from_peft(d):
        return lk.AdapterConfig(r=d["rank"], target_modules=["q_proj"])

    register_peft_type("TOYLORA", ("toy",), from_peft, lambda cfg, model, name: {"rank": cfg.r})
    try:
        cfg, _ = config_from_peft({"peft_type": "TOYLORA", "rank": 3})
        assert cfg.r == 3
    finally:
        _CODECS.pop("TOYLORA")
    with pytest.raises(lk.ConfigError, match="peft_type='TOYLORA' is not supported"):
        config_from_peft({"peft_type": "TOYLORA", "rank": 3})


def test_peft_dora_to_lorakit_and_back(tmp_path):
    pm = peft.get_peft_model(
        model_of("tiny-llama", "causal-lm"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    )
    randomize([p for n, p in pm.named_parameters() if "lora_A" in n or "lora_B" in n])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
        ref = logits_of(pm.eval()(X))
    pm.save_pretrained(tmp_path / "peft")
    model = load_adapter(model_of("tiny-llama", "causal-lm"), tmp_path / "peft")
    assert lk.adapter_configs(model)["default"].method == "dora"
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(X)), ref, rtol=1e-5, atol=1e-5)
    save_adapter(model, tmp_path / "mine")
    back = peft.PeftModel.from_pretrained(model_of("tiny-llama", "causal-lm"), tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(back(X)), ref, rtol=1e-5, atol=1e-5)


def test_loaded_adapter_keeps_rng_and_metadata(tmp_path):
    pm = peft_model("bert-classifier")
    pm.save_pretrained(tmp_path)
    model = model_of("tiny-bert", "classification")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_adapter(model, tmp_path)
    assert torch.equal(torch.rand(3), expected)  # injecting (random init) did not consume the user's RNG
    assert state_of(model).peft_meta["default"]["task_type"] == "SEQ_CLS"
    # PEFT lists "classifier" twice and adds "score" for SEQ_CLS; only the real head is kept.
    assert lk.adapter_configs(model)["default"].modules_to_save == ("classifier",)
    assert len(list(adapted_layers(model))) == 2


def test_pissa_adapter_round_trip_recomputes_the_residual(tmp_path):
    cfg = lk.AdapterConfig(init="pissa", r=4, target_modules=["q_proj", "v_proj"])
    model = lk.inject(model_of("tiny-llama", "causal-lm"), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        ref = logits_of(model(X))
    save_adapter(model, tmp_path)
    fresh = load_adapter(model_of("tiny-llama", "causal-lm"), tmp_path)  # base -> residual, then A, B
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fresh(X)), ref, rtol=1e-5, atol=1e-5)


def test_many_adapters_on_one_base(tmp_path):
    """Load several adapters, switch between them, disable them, delete them."""
    refs = {}
    pm = peft_model("llama-patterns-embedding")
    pm.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        refs["a"] = logits_of(pm(X))
    model = lk.inject(
        model_of("tiny-llama", "causal-lm"), lk.AdapterConfig(r=2, target_modules=["k_proj"]), "b"
    )
    randomize([p for p in model.parameters() if p.requires_grad], seed=9)
    with torch.no_grad():
        refs["b"] = logits_of(model(X))
        base = logits_of(model_of("tiny-llama", "causal-lm")(X))
    save_adapter(model, tmp_path, adapter_name="b")  # -> tmp_path/b
    model = model_of("tiny-llama", "causal-lm")
    load_adapter(model, tmp_path / "a", adapter_name="a")
    load_adapter(model, tmp_path, adapter_name="b")
    with torch.no_grad():
        for name in ("a", "b", "a"):
            lk.set_adapter(model, name)
            torch.testing.assert_close(logits_of(model(X)), refs[name], rtol=1e-5, atol=1e-5)
        with lk.disabled(model):
            torch.testing.assert_close(logits_of(model(X)), base, rtol=1e-5, atol=1e-5)
        lk.delete_adapter(model, "a")
        torch.testing.assert_close(logits_of(model(X)), refs["b"], rtol=1e-5, atol=1e-5)
        lk.delete_adapter(model, "b")
        torch.testing.assert_close(logits_of(model(X)), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [dict(method="lora"), dict(method="lora", use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}),
     dict(method="adalora", init_r=6, target_r=4, total_step=10)],
    ids=["lora", "rslora-patterns", "adalora"],
)
def test_transformers_own_load_adapter_reads_lorakit_adapters(tmp_path, kw):
    """transformers' built-in PEFT integration (`model.load_adapter(dir)`) gives lorakit's logits. (DoRA is
    left out: transformers 5.24 drops `lora_magnitude_vector` keys of PEFT's own DoRA files the same way.)"""
    import warnings

    x = torch.tensor([[1, 2, 3, 4, 5]])
    model = lk.build_model("tiny-llama")
    lk.inject(model, lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], **kw))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    lk.save_adapter(model, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = {"base_model_name_or_path", "revision", "task_type", "rank_pattern", "alpha_pattern"}
    assert fields | ({"use_rslora"} if kw["method"] == "lora" else set()) <= set(cfg)
    base = lk.build_model("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.load_adapter(str(tmp_path))
    torch.testing.assert_close(base(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
