import pytest
from torch import nn

import lorakit as lk
from lorakit.surgery.targets import ModuleInfo, TargetError, layer_index, match_targets

NAMES = [
    ("model.embed_tokens", "embedding"),
    ("model.layers.0.self_attn.q_proj", "linear"),
    ("model.layers.0.self_attn.k_proj", "linear"),
    ("model.layers.0.self_attn.v_proj", "linear"),
    ("model.layers.0.mlp.gate_proj", "linear"),
    ("model.layers.1.self_attn.q_proj", "linear"),
    ("model.layers.1.self_attn.v_proj", "linear"),
    ("model.layers.1.self_attn", None),
    ("lm_head", "linear"),
]
MODULES = [ModuleInfo(n, k, "Linear" if k else "LlamaAttention") for n, k in NAMES]


def names(**kw):
    return match_targets(MODULES, lk.AdapterConfig(**kw), head_names=["lm_head"])


def test_list_is_exact_or_suffix_match():
    assert names(target_modules=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert names(target_modules=["layers.1.self_attn.v_proj"]) == ["model.layers.1.self_attn.v_proj"]
    with pytest.raises(lk.TargetError):
        names(target_modules=["proj"])  # not a dotted suffix


def test_regex_is_full_match():
    assert names(target_modules=r".*\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(lk.TargetError, match="matched no module"):
        names(target_modules=r"q_proj")  # regex must match the whole name


def test_all_linear_skips_head_and_embeddings():
    got = names(target_modules="all-linear")
    assert "lm_head" not in got and "model.embed_tokens" not in got and len(got) == 6


def test_default_targets_pick_query_value():
    assert names() == [n for n, _ in NAMES if n.endswith(("q_proj", "v_proj"))]


def test_exclude_and_layers_to_transform():
    assert names(target_modules="all-linear", exclude_modules=["gate_proj", "k_proj"], layers_to_transform=[1]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("model.layers.3.mlp", layers_pattern="layers") == 3
    assert layer_index("lm_head") is None


def test_nothing_matches_lists_adaptable_names():
    with pytest.raises(lk.TargetError) as err:
        names(target_modules=["query"])
    msg = str(err.value)
    assert "matched no module" in msg and "q_proj" in msg and "gate_proj" in msg


def test_unsupported_type_is_named():
    with pytest.raises(lk.TargetError, match=r"'model.layers.1.self_attn' is a LlamaAttention"):
        names(target_modules=["self_attn"])


def test_find_targets_on_real_models_is_a_dry_run():
    model = lk.build_model("tiny-gpt2")
    before = {n: type(m) for n, m in model.named_modules()}
    got = lk.find_targets(model, lk.AdapterConfig(target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in got} == {"c_attn", "c_proj", "c_fc"}
    assert {n: type(m) for n, m in model.named_modules()} == before
    bert = lk.build_model("tiny-bert", task="classification")
    assert "classifier" not in lk.find_targets(bert, lk.AdapterConfig(target_modules="all-linear"))
    assert lk.find_targets(bert, lk.AdapterConfig())[0].endswith("attention.self.query")


def test_find_targets_after_injection_reports_original_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    cfg = lk.AdapterConfig(target_modules=["0", "2"])
    lk.inject(model, cfg)
    assert lk.find_targets(model, cfg) == ["0", "2"]


def test_a_partial_typo_in_a_target_list_is_an_error_naming_it():
    """`--targets qproj,v_proj` adapted v_proj only and reported success (issue 20 item 4)."""
    model = lk.build_model("tiny-llama")
    with pytest.raises(TargetError, match=r"'qproj' \(did you mean 'q_proj'\?\)"):
        lk.find_targets(model, lk.AdapterConfig(r=4, target_modules=["qproj", "v_proj"]))
    with pytest.raises(TargetError, match="qproj"):
        lk.inject(model, lk.AdapterConfig(r=4, target_modules=["qproj", "v_proj"]))
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was adapted
    with pytest.warns(UserWarning, match="qproj"):
        names = lk.find_targets(model, lk.AdapterConfig(r=4, target_modules=["qproj", "v_proj"]), strict=False)
    assert names and all(n.endswith("v_proj") for n in names)


def test_reading_an_adapter_file_with_an_unmatched_entry_only_warns(tmp_path):
    """PEFT accepts adapter files whose target list names modules the base lacks; lorakit warns."""
    import json

    model = lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "query"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = lk.build_model("tiny-llama")
    with pytest.warns(UserWarning, match="'query'"):
        lk.load_adapter(fresh, str(tmp_path))
    assert sum("lora_A" in n for n, _ in fresh.named_parameters()) == 4


def test_targets_left_out_by_layers_to_transform_are_named_as_such():
    model = lk.build_model("tiny-llama")  # 2 layers
    with pytest.raises(TargetError, match=r"matched 4 module\(s\).*layers_to_transform=\[5\] left none"):
        lk.find_targets(model, lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[5]))
