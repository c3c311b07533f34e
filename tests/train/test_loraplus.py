"""LoRA+ (B's learning rate ``loraplus_lr_ratio`` times A's) against PEFT's create_loraplus_optimizer on the
same model: the same parameters in each group with the same lr / weight decay, and the same tensors after
two AdamW steps; then through the trainer's config."""

import re

import pytest
import torch

import lorakit as lk
from helpers import logits_of, trained_group_rates
from lorakit.config import ConfigError
from lorakit.io import adapter_state, save_adapter
from lorakit.train.build import optimizer_groups

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])
LR, RATIO, WD = 1e-2, 16.0, 0.1
CASES = {
    # name: (model, task, adapter config): LoRA with an embedding; DoRA (vector magnitude) with a head
    "lora-embedding": ("tiny-llama", "causal-lm",
                       dict(target_modules=["q_proj", "v_proj", "embed_tokens"], alpha=8, r=4)),
    "dora-head": ("tiny-bert", "classification",
                  dict(method="dora", target_modules=["query", "value"], modules_to_save=["classifier"], r=4)),
}


def model_of(name, task):
    return lk.build_model(name, task=task, seed=0).float()


def canonical(name: str) -> str:
    """A parameter name of either library as a PEFT file key."""
    name = re.sub(r"\.(adapters|copies|modules_to_save)\.default\b", "", name)
    name = re.sub(r"\.(lora_\w+)\.default\b", r".\1", name)
    name = name.removesuffix(".weight") if "lora_magnitude_vector" in name or "lora_embedding" in name else name
    return name.removeprefix("base_model.model.")


def pair(case, tmp_path, **options):
    """(lorakit model, PEFT model) holding the same adapter (random non-zero A and B)."""
    name, task, kw = CASES[case]
    cfg = lk.AdapterConfig(method_options={"loraplus_lr_ratio": RATIO, **options}, **kw)
    mine = lk.inject(model_of(name, task), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mine.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(mine, tmp_path)
    theirs = peft.PeftModel.from_pretrained(model_of(name, task), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(theirs(X)), logits_of(mine(X)), rtol=1e-5, atol=1e-5)
    return mine, theirs


def group_table(groups, names):
    """[(sorted canonical names, lr, weight decay)] of the non-empty groups."""
    return sorted(
        (sorted(canonical(names[id(p)]) for p in g["params"]), g["lr"], g["weight_decay"])
        for g in groups
        if g["params"]
    )


def step(model, opt, loss_of):
    loss_of(model).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("case", list(CASES))
def test_groups_and_two_steps_equal_peft(case, tmp_path):
    mine, theirs = pair(case, tmp_path, loraplus_lr_embedding=1e-3)
    mine.eval(), theirs.eval()  # no dropout (BERT has its own): the same function on both sides; grads flow
    ours = torch.optim.AdamW(optimizer_groups(mine, WD, LR), lr=LR)
    peers = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD,
        loraplus_lr_embedding=1e-3,
    )
    mine_names = {id(p): n for n, p in mine.named_parameters()}
    peft_names = {id(p): n for n, p in theirs.named_parameters()}
    table = group_table(ours.param_groups, mine_names)
    assert table == group_table(peers.param_groups, peft_names)
    assert {lr for _, lr, _ in table} == ({LR, LR * RATIO, 1e-3} if case == "lora-embedding" else {LR, LR * RATIO})

    def loss_of(model):  # scaled so no gradient is near Adam's eps (which would amplify 1e-12 noise)
        return logits_of(model(X)).float().square().mean() * 1e6

    before = {k: v.clone() for k, v in adapter_state(mine).items()}
    for _ in range(2):
        step(mine, ours, loss_of)
        step(theirs, peers, loss_of)
    after = adapter_state(mine)
    peer_state = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    assert sorted(peer_state) == sorted(after)
    for key, t in peer_state.items():
        torch.testing.assert_close(after[key], t, rtol=1e-5, atol=1e-5, msg=key)
    moved = max((after[k] - before[k]).abs().max().item() for k in after if "lora_B" in k)
    assert moved > LR  # B moved by more than A's lr allows in two Adam steps: the ratio acted


def test_off_by_default_and_bad_options_are_one_line_errors():
    model = lk.inject(model_of("tiny-llama", "causal-lm"), lk.AdapterConfig(target_modules=["q_proj"]))
    groups = optimizer_groups(model, WD, LR)
    assert all("lr" not in g for g in groups)  # plain groups: the optimizer's lr for all
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        lk.AdapterConfig(method_options={"loraplus_lr_ratio": -1})
    with pytest.raises(ConfigError, match="loraplus_lr_embedding is set but loraplus_lr_ratio is not"):
        lk.AdapterConfig(method_options={"loraplus_lr_embedding": 1e-4})
    with pytest.raises(ConfigError, match="unknown key 'loraplus_ratio'.*did you mean"):
        lk.AdapterConfig(method_options={"loraplus_ratio": 16})


def test_the_trainer_uses_the_loraplus_groups(tmp_path):
    adapter = {"r": 4, "target_modules": ["q_proj"], "method_options": {"loraplus_lr_ratio": 8}}
    assert trained_group_rates(tmp_path, adapter) == [[1e-3, 8e-3]]
