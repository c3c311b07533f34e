"""Parameter counts from configs vs instantiated models, and LoRA counts vs r(d + k) and PEFT."""

from __future__ import annotations

import pytest
import torch

from lorakit.models import build_model
from lorakit.planner.arch import PlanError, arch_from_config, count_params, matrices, resolve_arch
from lorakit.planner.cost import Setup, trainable_params


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert", "llama-15m"])
@pytest.mark.parametrize("task", ["causal-lm", "classification", "base"])
def test_param_count_equals_instantiated_builtin(name, task):
    model = build_model(name, task=task)
    arch = resolve_arch(name, task=task)
    assert count_params(arch).total == n_params(model)
    names = dict(model.named_modules())
    for m in matrices(arch):  # every linear the planner knows is a real module with that shape
        weight = names[m.name].weight
        assert weight.numel() == m.d_in * m.d_out, m.name


def test_param_count_minilm_from_its_config_json():
    for task in ("base", "classification"):
        assert count_params(resolve_arch("minilm", task=task)).total == n_params(
            build_model("minilm", task=task)
        )


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama-bias-gqa-tied"])
def test_param_count_other_llama_like_configs(kind):
    import transformers as tf

    shape = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg = {
        "qwen2": lambda: tf.Qwen2Config(**shape),
        "mistral": lambda: tf.MistralConfig(head_dim=16, **shape),
        "llama-bias-gqa-tied": lambda: tf.LlamaConfig(
            attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=32, **shape
        ),
    }[kind]()
    model = tf.AutoModelForCausalLM.from_config(cfg)
    assert count_params(arch_from_config(cfg.to_dict())).total == n_params(model)


def test_reference_sizes_match_published_counts():
    assert count_params(resolve_arch("7B")).total == 6_738_415_616  # LLaMA-7B as released
    assert count_params(resolve_arch("65B")).total == pytest.approx(65.2e9, rel=0.01)
    assert count_params(resolve_arch("70B")).total == pytest.approx(69.0e9, rel=0.01)
    assert count_params(resolve_arch("175B")).total == pytest.approx(175e9, rel=0.01)


@pytest.mark.parametrize(
    "name,targets",
    [
        ("tiny-llama", ["q_proj", "v_proj"]),
        ("tiny-llama", "all-linear"),
        ("tiny-gpt2", ["c_attn"]),
        ("tiny-bert", ["query", "value"]),
    ],
)
def test_lora_trainable_equals_r_d_plus_k_and_peft(name, targets):
    peft = pytest.importorskip("peft")
    r = 4
    arch = resolve_arch(name)
    ours = trainable_params(
        arch, Setup(method="lora", r=r, targets=targets if isinstance(targets, str) else tuple(targets))
    )
    chosen = [
        m
        for m in matrices(arch)
        if targets == "all-linear"
        and m.name != "lm_head"
        or targets != "all-linear"
        and m.name.rsplit(".", 1)[-1] in targets
    ]
    assert ours == sum(r * (m.d_in + m.d_out) for m in chosen)  # r(d + k) over the targeted matrices
    model = build_model(name)
    cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, fan_in_fan_out=name == "tiny-gpt2")
    pm = peft.get_peft_model(model, cfg)
    assert ours == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_dora_adds_a_magnitude_per_output_row():
    arch = resolve_arch("tiny-llama")
    lora = trainable_params(arch, Setup(method="lora", r=4))
    dora = trainable_params(arch, Setup(method="dora", r=4))
    assert dora - lora == sum(m.d_out for m in matrices(arch) if m.name.endswith(("q_proj", "v_proj")))


@pytest.mark.parametrize("bad", ["0B", "-7B", "0", "12B", "no-such-model", ""])
def test_bad_model_specs_give_clear_errors(bad):
    with pytest.raises(PlanError, match="model="):
        resolve_arch(bad)


def test_unknown_size_lists_known_sizes():
    with pytest.raises(PlanError, match=r"known sizes: \['1B'"):
        resolve_arch("12B")


def test_model_dir_without_config(tmp_path):
    with pytest.raises(PlanError, match="config.json"):
        resolve_arch(str(tmp_path))
