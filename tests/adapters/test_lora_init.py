"""LoRA initialisations that change the base weight (PiSSA, OLoRA) or start from the quantization error
(LoftQ), checked against PEFT 0.21 on the same weights, and their files checked on a fresh base.

A base-changing init keeps the residual W - s B0 A0 in the model; its saved file must still be right on
the unchanged base, so it is written as PEFT's ``path_initial_model_for_weight_conversion`` writes it:
a rank-2r LoRA [A | A0], [B | -B0] with ``init_lora_weights: true``. The round trips below load that
file on a fresh base three ways: lorakit, PEFT, and a plain "vLLM-style" consumer that only adds
(alpha / r) B A to each weight.
"""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from helpers import logits_of
from lorakit.io import load_adapter, save_adapter

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*changes the base weights.*")

X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def model_of(name="tiny-llama", task="causal-lm", seed=0):
    return lk.build_model(name, task=task, seed=seed).float()


def perturb(model, seed=0, scale=0.05):
    """Stand-in for training: move every trainable tensor, so A, B differ from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def plain_consumer(model, folder):
    """What a vLLM-style consumer computes from the files: W + (alpha / r) B A on the given base, no
    other knowledge of the init (rank_pattern / alpha_pattern are not used by these tests)."""
    with open(folder / "adapter_config.json") as f:
        config = json.load(f)
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                path = key[len("base_model.model.") : -len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                assert a.shape[0] == r and b.shape[1] == r
                modules[path].weight += scale * (b @ a)
    return model


def trained(init, r=4, **kw):
    cfg = lk.AdapterConfig(init=init, r=r, alpha=8, target_modules=TARGETS, **kw)
    model = lk.inject(model_of(), cfg)
    perturb(model)
    with torch.no_grad():
        ref = logits_of(model(X))
        base = logits_of(model_of()(X))
    assert (ref - base).abs().max() > 1e-3  # the adapter matters, so the comparisons below can fail
    return model, ref


# ------------------------------------------------------------------------------- base-changing inits
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_file_is_right_on_a_fresh_base(init, use_rslora, tmp_path):
    model, ref = trained(init, use_rslora=use_rslora)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # converted: rank 2r, plain LoRA
    with torch.no_grad():
        plain = logits_of(plain_consumer(model_of(), tmp_path)(X))
        mine = logits_of(load_adapter(model_of(), tmp_path)(X))
        theirs = logits_of(peft.PeftModel.from_pretrained(model_of(), tmp_path).eval()(X))
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ref, rtol=1e-5, atol=1e-5)


def test_loading_a_pissa_file_leaves_the_shared_base_alone(tmp_path):
    """A second adapter on the same base must give what it gives alone (the server mixes adapters)."""
    model, _ = trained("pissa")
    save_adapter(model, tmp_path / "p")
    other = lk.inject(model_of(), lk.AdapterConfig(r=2, target_modules=["q_proj"]), "b")
    perturb(other, seed=3)
    with torch.no_grad():
        alone = logits_of(other(X))
    load_adapter(other, tmp_path / "p", adapter_name="p", activate=False)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(other(X)), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_on_the_same_weights(init):
    """Adapter tensors and the modified base weights, both against PEFT's init_lora_weights=init."""
    cfg = lk.AdapterConfig(init=init, r=4, alpha=8, target_modules=TARGETS)
    mine = lk.inject(model_of(), cfg)
    theirs = peft.get_peft_model(
        model_of(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    ours = {k: v for k, v in lk.io.adapter_state(mine).items()}
    peft_state = peft.get_peft_model_state_dict(theirs)
    assert sorted(ours) == sorted(peft_state)
    for key, t in ours.items():
        torch.testing.assert_close(t, peft_state[key], rtol=1e-5, atol=1e-5, msg=key)
    bases = {n: layer.base.weight for n, layer in lk.surgery.inject.adapted_layers(mine)}
    fresh = dict(model_of().named_parameters())
    for name, w in bases.items():
        peft_w = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(w, peft_w, rtol=1e-5, atol=1e-5, msg=name)
        assert (w - fresh[f"{name}.weight"]).abs().max() > 1e-3  # the base did change
