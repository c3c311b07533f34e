"""Mixed-adapter batches: every row equals that row run alone with its adapter set (the single-adapter path,
itself checked against PEFT and the LoRA equation in tests/adapters), for LoRA and rsLoRA of different ranks."""

from __future__ import annotations

import pytest
import torch

import lorakit
from helpers import logits_alone
from lorakit.serving import (
    BASE,
    MixedBatchError,
    adapter_rows,
    enable_adapter_names,
    generate_rows,
    mixed_forward,
)

SPECS = [  # (name, r, use_rslora, targets): different ranks, rsLoRA, an embedding and different layer sets
    ("a0", 2, False, ["q_proj", "v_proj"]),
    ("a1", 8, True, ["q_proj", "v_proj", "o_proj"]),
    ("a2", 4, False, ["q_proj", "v_proj", "embed_tokens"]),
    ("a3", 3, False, ["k_proj", "down_proj"]),
]


def build(specs=SPECS, name="tiny-llama"):
    model = lorakit.build_model(name)
    gen = torch.Generator().manual_seed(0)
    for adapter, r, rs, targets in specs:
        lorakit.inject(
            model, lorakit.AdapterConfig(r=r, alpha=8, use_rslora=rs, target_modules=targets), adapter
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{adapter}." in n or n.endswith(f".{adapter}"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def test_mixed_rows_equal_each_row_alone():
    model = build()
    names = ["a0", BASE, "a1", "a2", "a3", "a1", BASE, "a0"]
    x = torch.randint(0, 256, (len(names), 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = mixed_forward(model, x, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = logits_alone(model, x[i : i + 1], name)
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0, msg=f"row {i} ({name})")
    # the adapters really differ from each other and from the base, so the check can fail
    assert (logits_alone(model, x[:1], "a0") - logits_alone(model, x[:1], "a1")).abs().max() > 1e-2
    assert (logits_alone(model, x[:1], "a0") - logits_alone(model, x[:1], BASE)).abs().max() > 1e-2


def test_mixed_on_gpt2_conv1d():
    model = build([("g0", 4, False, ["c_attn"]), ("g1", 2, True, ["c_attn", "c_proj"])], name="tiny-gpt2")
    names = ["g1", "g0", BASE]
    x = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        mixed = mixed_forward(model, x, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], logits_alone(model, x[i : i + 1], name)[0], atol=1e-5, rtol=0)


def test_uniform_batch_and_model_kwarg():
    model = enable_adapter_names(build())
    x = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        same = model(x, adapter_names=["a2"] * 3).logits
        plain = model(x).logits  # without adapter_names: the active adapter (the last injected, a3)
    torch.testing.assert_close(same, logits_alone(model, x, "a2"), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, logits_alone(model, x, "a3"), atol=1e-5, rtol=0)
    assert all(layer.row_routing is None for _, layer in lorakit.surgery.inject.adapted_layers(model))


def test_generate_with_kv_cache_matches_each_row_alone():
    model = enable_adapter_names(build())
    prompts = [[257, 10, 20, 30], [257, 40], [257, 1, 2, 3, 4, 5, 6], [257, 7, 8]]
    names = ["a1", BASE, "a2", "a3"]
    out = generate_rows(model, prompts, names, max_new_tokens=10, eos_token_id=None)
    for p, name, got in zip(prompts, names, out):
        with torch.no_grad():
            if name == BASE:
                with lorakit.disabled(model):
                    ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
            else:
                lorakit.set_adapter(model, name)
                ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert got == ref[0, len(p) :].tolist(), name
    # model.generate(..., adapter_names=) on an equal-length batch
    lorakit.set_adapter(model, "a0")
    batch = torch.tensor([[257, 5, 6], [257, 5, 6]])
    with torch.no_grad():
        both = model.generate(batch, max_new_tokens=6, do_sample=False, adapter_names=["a1", "a3"])
    assert both[0].tolist() != both[1].tolist()
    # generate_rows() cuts after EOS; model.generate pads the finished row after it
    alone = generate_rows(model, [[257, 5, 6]], ["a3"], max_new_tokens=6)[0]
    assert both[1, 3 : 3 + len(alone)].tolist() == alone


def test_cache_follows_weight_changes_and_new_adapters():
    model = build(SPECS[:2])
    x = torch.randint(0, 256, (2, 5))
    names = ["a0", "a1"]
    with torch.no_grad():
        before = mixed_forward(model, x, adapter_names=names).logits
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        layer.adapters["a0"].lora_B.weight.mul_(2.0)  # in-place change: the stacks must be rebuilt
        after = mixed_forward(model, x, adapter_names=names).logits
    assert (before[0] - after[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[0], logits_alone(model, x[:1], "a0")[0], atol=1e-5, rtol=0)
    lorakit.inject(model, lorakit.AdapterConfig(r=16, alpha=4, target_modules=["q_proj"]), "late")
    with torch.no_grad():
        model.get_submodule("model.layers.1.self_attn.q_proj").adapters["late"].lora_B.weight.normal_()
        out = mixed_forward(model, x, adapter_names=["late", "a1"]).logits
    torch.testing.assert_close(out[0], logits_alone(model, x[:1], "late")[0], atol=1e-5, rtol=0)
    lorakit.delete_adapter(model, "a0")
    with pytest.raises(MixedBatchError, match="no adapter named 'a0'"):
        mixed_forward(model, x, adapter_names=["a0", "a1"])


def test_clear_errors():
    model = build(SPECS[:2])
    x = torch.randint(0, 256, (2, 5))
    with pytest.raises(MixedBatchError, match="no adapter named 'nope'"):
        mixed_forward(model, x, adapter_names=["nope", "a0"])
    with pytest.raises(MixedBatchError, match="3 rows but adapter_names has 2"):
        mixed_forward(model, torch.randint(0, 256, (3, 5)), adapter_names=["a0", "a1"])
    with pytest.raises(MixedBatchError, match="one name per row"):
        mixed_forward(model, x, adapter_names="a0")
    lorakit.inject(model, lorakit.AdapterConfig(method="dora", r=2, alpha=4, target_modules=["q_proj"]), "d")
    with pytest.raises(MixedBatchError, match="'d' on layer .* DoraLinear"):
        mixed_forward(model, x, adapter_names=["d", "a0"])
    with torch.no_grad():
        mixed_forward(model, x, adapter_names=["a1", "a0"])  # a DoRA adapter that is not used is fine
    lorakit.set_adapter(model, "a0")
    model.get_submodule("model.layers.0.self_attn.q_proj").merge("a0")
    with pytest.raises(MixedBatchError, match="merged"):
        mixed_forward(model, x, adapter_names=["a1", "a0"])
    assert all(layer.row_routing is None for _, layer in lorakit.surgery.inject.adapted_layers(model))


def test_modules_to_save_refused_and_bypassed():
    model = lorakit.build_model("tiny-bert", task="classification")
    lorakit.inject(
        model, lorakit.AdapterConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "c"
    )
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["value"]), "v")
    x = torch.randint(0, 256, (2, 6))
    with pytest.raises(MixedBatchError, match="modules_to_save"):
        mixed_forward(model, x, adapter_names=["c", "v"])
    with torch.no_grad(), adapter_rows(model, ["v", BASE]):
        mixed = model(x).logits
    torch.testing.assert_close(mixed[0], logits_alone(model, x[:1], "v")[0], atol=1e-5, rtol=0)


def test_matches_peft_mixed_batch():
    """Independent reference: PEFT's own mixed batch (``adapter_names=``, "__base__" for the base) on the
    same weights, with different ranks and rsLoRA."""
    from peft import LoraConfig, get_peft_model

    specs = [("p0", 2, False), ("p1", 6, True), ("p2", 4, False)]
    ours = build([(n, r, rs, ["q_proj", "v_proj"]) for n, r, rs in specs])
    theirs = None
    for n, r, rs in specs:
        cfg = LoraConfig(r=r, lora_alpha=8, use_rslora=rs, target_modules=["q_proj", "v_proj"])
        if theirs is None:
            theirs = get_peft_model(lorakit.build_model("tiny-llama"), cfg, adapter_name=n)
        else:
            theirs.add_adapter(n, cfg)
    with torch.no_grad():
        for path, layer in lorakit.surgery.inject.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(path)
            for n, _, _ in specs:
                peft_layer.lora_A[n].weight.copy_(layer.adapters[n].lora_A.weight)
                peft_layer.lora_B[n].weight.copy_(layer.adapters[n].lora_B.weight)
    names = ["p1", "__base__", "p0", "p2", "p1"]
    x = torch.randint(0, 256, (5, 10))
    with torch.no_grad():
        expected = theirs.eval()(x, adapter_names=names).logits
        got = mixed_forward(ours, x, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generate_is_the_old_name_of_generate_rows():
    import lorakit.serving as serving
    import lorakit.serving.mixed as mixed

    assert mixed.generate is mixed.generate_rows
    assert serving.generate is serving.generate_rows is mixed.generate_rows
    assert lorakit.generate is lorakit.generate_rows is mixed.generate_rows
