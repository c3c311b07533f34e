"""LoRA layers against the equation written out by hand, and against PEFT on identical weights."""

import copy
import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters.lora import LoraLinear
from lorakit.weights import weight_access


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(3, 4, 3)

    def forward(self, x, ids, img, seq):
        return self.fc(x), self.emb(ids), self.conv(img), self.conv1(seq)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 6, generator=g), torch.randint(0, 11, (2, 4), generator=g),
            torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 9, generator=g))


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_init_equals_base(init):
    base = Toy()
    targets = ["fc"] if init == "pissa" else ["fc", "emb", "conv", "conv1"]
    model = lk.inject(copy.deepcopy(base), lk.AdapterConfig(r=2, target_modules=targets, init=init))
    inputs = _inputs()
    for a, b in zip(base(*inputs), model(*inputs)):
        if init == "pissa":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # residual + principal part = W
        else:
            assert torch.equal(a, b)


def test_forward_equals_equation_by_hand():
    base = Toy()
    cfg = lk.AdapterConfig(r=3, alpha=6, target_modules=["fc", "emb", "conv", "conv1"])
    model = lk.inject(copy.deepcopy(base), cfg)
    _randomize(model)
    x, ids, img, seq = _inputs()
    s = 6 / 3
    fc = model.fc.adapters["default"]
    want_fc = x @ base.fc.weight.T + base.fc.bias + s * (x @ fc.lora_A.weight.T @ fc.lora_B.weight.T)
    emb = model.emb.adapters["default"]
    want_emb = base.emb.weight[ids] + s * (emb.lora_embedding_B @ emb.lora_embedding_A).T[ids]
    conv = model.conv.adapters["default"]
    w = base.conv.weight + s * torch.einsum("or,rikl->oikl", conv.lora_B.weight[:, :, 0, 0], conv.lora_A.weight)
    want_conv = nn.functional.conv2d(img, w, base.conv.bias, padding=1)
    c1 = model.conv1.adapters["default"]
    w1 = base.conv1.weight + s * torch.einsum("or,rik->oik", c1.lora_B.weight[:, :, 0], c1.lora_A.weight)
    want_c1 = nn.functional.conv1d(seq, w1, base.conv1.bias)
    got = model(x, ids, img, seq)
    for g, want in zip(got, (want_fc, want_emb, want_conv, want_c1)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_and_rank_pattern():
    cfg = lk.AdapterConfig(r=4, alpha=8, use_rslora=True, target_modules=["fc"], rank_pattern={"fc": 16})
    model = lk.inject(Toy(), cfg)
    ad = model.fc.adapters["default"]
    assert ad.r == 16 and ad.scaling == pytest.approx(8 / math.sqrt(16))


def test_delta_weight_matches_forward():
    model = lk.inject(Toy(), lk.AdapterConfig(r=2, target_modules=["fc", "emb", "conv"]))
    _randomize(model)
    x, ids, img, _ = _inputs()
    for layer, inp, fn in ((model.fc, x, lambda w, b, i: nn.functional.linear(i, w, b)),
                           (model.emb, ids, lambda w, b, i: nn.functional.embedding(i, w)),
                           (model.conv, img, lambda w, b, i: nn.functional.conv2d(i, w, b, padding=1))):
        w = layer.base.weight + layer.adapters["default"].delta_weight(layer.access)
        torch.testing.assert_close(layer(inp), fn(w, layer.access.bias, inp), atol=1e-5, rtol=1e-5)


def test_gradients_only_on_adapters_and_modules_to_save():
    model = lk.build_model("tiny-bert", task="classification")
    lk.inject(model, lk.AdapterConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    out = model(input_ids=torch.randint(0, 256, (2, 8)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".adapters.default.lora_" in n or ".copies.default." in n for n in trainable)
    assert any("classifier.copies.default" in n for n in with_grad)


def test_bf16_base_keeps_fp32_adapter_and_base_dtype_output():
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    holder = nn.Sequential(layer)
    lk.inject(holder, lk.AdapterConfig(r=2, target_modules=["0"]))
    adapter = holder[0].adapters["default"]
    assert adapter.lora_A.weight.dtype == torch.float32
    y = holder(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_lora_linear_standalone_matches_equation():
    ad = LoraLinear(5, 7, r=2, alpha=4)
    with torch.no_grad():
        ad.lora_B.weight.normal_()
    base = nn.Linear(5, 7)
    x = torch.randn(4, 5)
    got = ad(x, base(x), weight_access(base))
    torch.testing.assert_close(got, base(x) + 2.0 * x @ ad.lora_A.weight.T @ ad.lora_B.weight.T)


def test_dropout_applies_only_in_training():
    model = lk.inject(nn.Sequential(nn.Linear(16, 16)), lk.AdapterConfig(r=4, dropout=0.5, target_modules=["0"]))
    _randomize(model)
    x = torch.randn(4, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)


# ---- against the peer: PEFT on identical weights ----

PEER_CASES = [
    ("tiny-llama", "causal-lm", ["q_proj", "v_proj"], {}),
    ("tiny-llama", "causal-lm", "all-linear", {"use_rslora": True}),
    ("tiny-gpt2", "causal-lm", ["c_attn"], {}),
    ("tiny-bert", "base", ["query", "value"], {}),
]


@pytest.mark.parametrize("name, task, targets, extra", PEER_CASES)
def test_same_forward_as_peft(name, task, targets, extra):
    peft = pytest.importorskip("peft")
    from helpers import logits_of

    base = lk.build_model(name, task=task)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=name == "tiny-gpt2", **extra)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    _randomize(pm, seed=3)
    ours = lk.inject(copy.deepcopy(base), lk.AdapterConfig(r=4, alpha=8, target_modules=targets, **extra))
    peft_targets = sorted(n[len("base_model.model."):] for n, m in pm.named_modules() if hasattr(m, "lora_A")
                          and isinstance(m.lora_A, nn.ModuleDict) and "default" in m.lora_A)
    assert sorted(lk.find_targets(base, lk.AdapterConfig(target_modules=targets))) == peft_targets
    state = {k[len("base_model.model."):].replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    for lname, layer in ours.named_modules():
        if isinstance(layer, lk.AdaptedLayer):
            layer.adapters["default"].load_peft_state(
                {k[len(lname) + 1:]: v for k, v in state.items() if k.startswith(lname + ".")})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (logits_of(pm(input_ids=ids)) - logits_of(ours(input_ids=ids))).abs().max().item()
    assert diff <= 1e-6
    with lk.disabled(ours):
        assert not torch.allclose(logits_of(ours(input_ids=ids)), logits_of(pm(input_ids=ids)))
