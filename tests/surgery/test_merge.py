"""merge / unmerge / unload / combine_adapters, and ``lorakit merge``; checked against the equations
and against PEFT (merge_and_unload, add_weighted_adapter) on the same weights."""

import copy
import json
import os

import pytest
import torch

import lorakit as lk
from helpers import logits_of
from lorakit.io import load_adapter, save_adapter
from lorakit.state import peek_state
from lorakit.surgery.inject import adapted_layers
from lorakit.surgery.layer import AdaptedLayer, TrainedCopy
from lorakit.surgery.merge import combine_adapters, is_merged, merge, unload, unmerge

X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])


def adapted(name="tiny-llama", task="causal-lm", seed=1, adapter_name="default", model=None, **cfg):
    model = model if model is not None else lk.build_model(name, task=task).float()
    cfg = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"], **cfg}
    lk.inject(model, lk.AdapterConfig(**cfg), adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter_name}." in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def out(model):
    with torch.no_grad():
        return logits_of(model(X))


def base_weights(model):
    return {n: layer.base.weight.detach().clone() for n, layer in adapted_layers(model)}


def test_merged_equals_unmerged_and_round_trip():
    model = adapted()
    ref, w0 = out(model), base_weights(model)
    merge(model)
    assert is_merged(model)
    torch.testing.assert_close(out(model), ref, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(w0[n], layer.base.weight) for n, layer in adapted_layers(model))
    # the merged weight is W + (alpha/r) B A, written out (embedding: the transpose)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
    torch.testing.assert_close(layer.base.weight, w0["model.layers.0.self_attn.q_proj"] + 16 / 4 * b @ a)
    with pytest.raises(lk.AdapterStateError, match="already merged"):
        merge(model)
    unmerge(model)
    for n, layer in adapted_layers(model):
        rel = (layer.base.weight - w0[n]).abs().max() / w0[n].abs().max()
        assert rel < 1e-5, n
    torch.testing.assert_close(out(model), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(lk.AdapterStateError, match="nothing to unmerge"):
        unmerge(model)


def test_non_finite_merge_is_refused_and_undone():
    model = adapted()
    w0 = base_weights(model)
    with torch.no_grad():  # only the last layer's update overflows: earlier layers merge, then roll back
        model.get_submodule("model.layers.1.self_attn.v_proj").adapters["default"].lora_B.weight.fill_(3e38)
    with pytest.raises(lk.AdapterStateError, match="'model.layers.1.self_attn.v_proj'.*non-finite"):
        merge(model)
    assert not is_merged(model)
    for n, layer in adapted_layers(model):
        assert torch.equal(layer.base.weight, w0[n]), n


def test_merge_matches_peft_merge_and_unload():
    peft = pytest.importorskip("peft")
    for name, targets in (("tiny-gpt2", ["c_attn", "c_proj"]), ("tiny-llama", ["q_proj", "down_proj"])):
        pm = peft.get_peft_model(
            lk.build_model(name).float(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        )
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        ours = lk.build_model(name).float()
        lk.inject(ours, lk.AdapterConfig(r=4, alpha=8, target_modules=targets))
        with torch.no_grad():
            state = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
            for lname, layer in adapted_layers(ours):
                layer.adapters["default"].load_peft_state(
                    {
                        key: state[f"base_model.model.{lname}.{key}"]
                        for key in ("lora_A.weight", "lora_B.weight")
                    }
                )
        theirs = pm.merge_and_unload().state_dict()
        mine = unload(ours).state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_unload_returns_plain_original_classes():
    fresh = lk.build_model("tiny-bert", task="classification").float()
    model = adapted(
        "tiny-bert", "classification", target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(0.5)
    ref = out(model)
    plain = unload(model)
    assert plain is model
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in fresh.named_modules()}
    assert not any(isinstance(m, (AdaptedLayer, TrainedCopy)) for m in plain.modules())
    assert peek_state(plain) is None  # no adapter state is left on the plain model
    torch.testing.assert_close(out(plain), ref, rtol=1e-5, atol=1e-5)  # the trained head was kept


def test_unload_without_merge_gives_the_base():
    base = out(lk.build_model("tiny-llama").float())
    model = adapted()
    merge(model)
    torch.testing.assert_close(out(unload(model, merge=False)), base, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def two_adapters():
    model = adapted(target_modules=["q_proj", "v_proj"], seed=1)
    adapted(
        model=model,
        adapter_name="b",
        r=2,
        alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj"],
        seed=2,
    )
    return model


def test_combine_cat_is_the_exact_weighted_sum_of_deltas(tmp_path):
    model = two_adapters()
    combine_adapters(model, ["default", "b"], [0.7, -1.3], "mix", how="cat")
    assert lk.active_adapter(model) == "b"  # added inactive
    for _, layer in adapted_layers(model):
        access = layer.access
        want = sum(
            w * layer.adapters[n].delta_weight(access)
            for n, w in (("default", 0.7), ("b", -1.3))
            if n in layer.adapters
        )
        torch.testing.assert_close(layer.adapters["mix"].delta_weight(access), want, rtol=1e-5, atol=1e-6)
    q = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["mix"]
    assert q.r == 6 and model.get_submodule("model.layers.0.self_attn.v_proj").adapters["mix"].r == 4
    # the combined adapter saves and reloads like any other (its rank_pattern goes through the json)
    lk.set_adapter(model, "mix")
    ref = out(model)
    save_adapter(model, tmp_path, adapter_name="mix")
    fresh = load_adapter(lk.build_model("tiny-llama").float(), tmp_path, adapter_name="mix")
    torch.testing.assert_close(out(fresh), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["cat", "linear"])
def test_combine_matches_peft_add_weighted_adapter(how, tmp_path):
    peft = pytest.importorskip("peft")
    base = lk.build_model("tiny-llama").float()
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    pm.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path, selected_adapters=["default", "b"])
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    load_adapter(ours, tmp_path, adapter_name="b")
    pm.add_weighted_adapter(["default", "b"], [0.6, -0.9], "mix", combination_type=how)
    pm.set_adapter("mix")
    combine_adapters(ours, ["default", "b"], [0.6, -0.9], "mix", how=how)
    lk.set_adapter(ours, "mix")
    torch.testing.assert_close(out(ours), out(pm.eval()), rtol=1e-5, atol=1e-5)


def test_combine_bad_inputs():
    model = two_adapters()
    with pytest.raises(lk.ConfigError, match="how='svd' is not supported"):
        combine_adapters(model, ["default", "b"], [1, 1], "m", how="svd")
    with pytest.raises(lk.ConfigError, match="one weight per adapter"):
        combine_adapters(model, ["default", "b"], [1], "m")
    with pytest.raises(lk.AdapterStateError, match="no adapter named 'zzz'"):
        combine_adapters(model, ["default", "zzz"], [1, 1], "m")
    with pytest.raises(lk.ConfigError, match="how='linear' needs equal ranks"):
        combine_adapters(model, ["default", "b"], [1, 1], "m", how="linear")
    with pytest.raises(lk.AdapterStateError, match="already in the model"):
        combine_adapters(model, ["default", "b"], [1, 1], "b")
    assert list(lk.adapter_configs(model)) == ["default", "b"]
    heads = adapted("tiny-bert", "classification", target_modules=["query"], modules_to_save=["classifier"])
    with pytest.raises(lk.ConfigError, match="modules_to_save"):
        combine_adapters(heads, ["default"], [1.0], "m")


def test_cli_merge_writes_a_plain_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lorakit.cli.main import main

    model = adapted(
        "tiny-bert",
        "classification",
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        model=lk.build_model("tiny-bert", task="classification", num_labels=3).float(),
    )
    ref = out(model)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (
        main(
            [
                "merge",
                "--model",
                "tiny-bert",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert "model.safetensors" in os.listdir(tmp_path / "merged")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.num_labels == 3  # read from the saved classifier head
    torch.testing.assert_close(out(plain), ref, rtol=1e-5, atol=1e-5)


def test_cli_merge_bad_adapter_is_one_line_error(tmp_path, capsys):
    from lorakit.cli.main import main

    assert (
        main(
            [
                "merge",
                "--model",
                "tiny-llama",
                "--adapter",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert not os.path.exists(tmp_path / "o")
