"""DoRA against the equation written out by hand and against PEFT's DoRA (use_dora=True) on identical weights."""

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters.dora import DoraLinear, build_dora
from lorakit.weights import weight_access

PREFIX = "base_model.model."


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero A, B and a magnitude moved away from its init (works for lorakit and PEFT names)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _dora(d_in=12, d_out=7, r=3, alpha=6, bias=True, seed=0) -> tuple[nn.Linear, DoraLinear]:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    ad = DoraLinear(d_in, d_out, r, alpha)
    ad.init_magnitude(weight_access(base))
    _randomize(ad, seed)
    return base, ad


def _equation(base: nn.Linear, ad: DoraLinear, x: torch.Tensor) -> torch.Tensor:
    """y = m / ||W0 + sBA||_c * (x W0^T + s x A^T B^T) + b, the norm taken directly on the dense sum."""
    w = base.weight + ad.scaling * ad.lora_B.weight @ ad.lora_A.weight
    y = (ad.lora_magnitude_vector / torch.linalg.vector_norm(w, dim=1)) * (x @ w.T)
    return y if base.bias is None else y + base.bias


# ---- the equation ----


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_equation_by_hand(bias):
    base, ad = _dora(bias=bias)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(
        ad(x, base(x), weight_access(base)), _equation(base, ad, x), atol=1e-6, rtol=1e-5
    )


def test_row_norm_without_dense_sum_matches_direct_norm_and_tracks_base_changes():
    base, ad = _dora(d_in=64, d_out=48, r=8)
    access = weight_access(base)
    for s in (0.5, 2.0, 30.0):
        ad.scaling = s
        direct = torch.linalg.vector_norm(base.weight + s * ad.lora_B.weight @ ad.lora_A.weight, dim=1)
        torch.testing.assert_close(ad.weight_norm(access), direct, rtol=1e-5, atol=0)
    ad.scaling = 2.0
    with torch.no_grad():  # the cached ||W0||^2 must not survive an in-place change of the base weight
        base.weight.mul_(3.0)
    direct = torch.linalg.vector_norm(base.weight + 2.0 * ad.lora_B.weight @ ad.lora_A.weight, dim=1)
    torch.testing.assert_close(ad.weight_norm(access), direct, rtol=1e-5, atol=0)
    with torch.no_grad():  # near-total cancellation (W0 + sBA ~ 0 on a row) falls back to the direct norm
        ad.lora_B.weight.zero_()
        ad.lora_B.weight[0, 0] = 1.0
        base.weight[0] = -2.0 * ad.lora_A.weight[0] + 1e-4
    direct = torch.linalg.vector_norm(base.weight + 2.0 * ad.lora_B.weight @ ad.lora_A.weight, dim=1)
    torch.testing.assert_close(ad.weight_norm(access), direct, rtol=1e-4, atol=0)


def test_init_equals_base_exactly():
    base = lk.build_model("tiny-llama", task="causal-lm")
    model = lk.inject(copy.deepcopy(base), lk.AdapterConfig(method="dora", r=4, target_modules="all-linear"))
    ids = torch.randint(0, 256, (2, 10))
    assert torch.equal(_logits(base(input_ids=ids)), _logits(model(input_ids=ids)))
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]
    w = base.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(
        ad.lora_magnitude_vector, torch.linalg.vector_norm(w, dim=1), rtol=1e-6, atol=0
    )


def test_zero_row_in_base_stays_finite_and_starts_at_base():
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[1] = 0.0
    ad = DoraLinear(6, 4, r=2, alpha=2)
    ad.init_magnitude(weight_access(base))
    x = torch.randn(3, 6)
    y = ad(x, base(x), weight_access(base))
    assert torch.isfinite(y).all() and torch.equal(y, base(x))


def test_gradients_reach_a_b_and_magnitude_only_with_detached_norm():
    base, ad = _dora()
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 12, requires_grad=True)
    y = ad(x, base(x), weight_access(base))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())
    assert base.weight.grad is None and base.bias.grad is None and x.grad is not None
    # d y / d m_i = (x W0 + s x A^T B^T)_i / ||W0 + sBA||_i with the norm a constant (paper section 4.3)
    w = base.weight + ad.scaling * ad.lora_B.weight.detach() @ ad.lora_A.weight.detach()
    want = (g * (x.detach() @ w.T)).sum(0) / torch.linalg.vector_norm(w, dim=1)
    torch.testing.assert_close(ad.lora_magnitude_vector.grad, want, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_base():
    for name, targets in (("tiny-llama", ["q_proj", "v_proj", "o_proj"]), ("tiny-gpt2", ["c_attn"])):
        model = lk.inject(
            lk.build_model(name, task="causal-lm"),
            lk.AdapterConfig(method="dora", r=4, alpha=8, target_modules=targets),
        )
        _randomize(model, seed=1)
        model.eval()
        ids = torch.randint(0, 256, (2, 10))
        before = {
            n: m.base.weight.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, lk.AdaptedLayer)
        }
        want = _logits(model(input_ids=ids))
        layers = [m for m in model.modules() if isinstance(m, lk.AdaptedLayer)]
        for layer in layers:
            layer.merge("default")
        torch.testing.assert_close(_logits(model(input_ids=ids)), want, atol=1e-5, rtol=1e-5)
        for layer in layers:
            layer.unmerge()
        for n, m in model.named_modules():
            if isinstance(m, lk.AdaptedLayer):
                torch.testing.assert_close(m.base.weight, before[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(_logits(model(input_ids=ids)), want, atol=1e-5, rtol=1e-5)


def test_unmerge_without_merge_and_non_linear_targets_are_clear_errors():
    base, ad = _dora()
    with pytest.raises(lk.AdapterStateError, match="no recorded merge"):
        ad.unmerge_weight(weight_access(base), base.weight)
    with pytest.raises(ValueError, match="linear layers"):
        lk.inject(nn.Sequential(nn.Embedding(10, 4)), lk.AdapterConfig(method="dora", target_modules=["0"]))
    with pytest.raises(lk.ConfigError, match="'emb' is an embedding layer"):
        build_dora(weight_access(nn.Embedding(10, 4)), lk.AdapterConfig(method="dora"), "emb")


def test_bf16_base_gives_bf16_output_close_to_fp32():
    base, ad = _dora()
    x = torch.randn(3, 12)
    want = _equation(base, ad, x)
    b16 = copy.deepcopy(base).to(torch.bfloat16)
    got = ad(x.bfloat16(), b16(x.bfloat16()), weight_access(b16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


class FakeQuantLinear(nn.Module):
    """A stand-in quantized linear: stores the weight rounded to a coarse grid, exposes weight access."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.round(linear.weight.detach() * 16).to(torch.int8))
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dense_weight(self, dtype=None):
        return self.codes.to(dtype or torch.float32) / 16

    def set_dense_weight(self, w):
        self.codes = torch.round(w * 16).to(torch.int8)

    def forward(self, x):
        return nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)


def _quantized_bases():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    from lorakit.quant import NF4Linear

    return [("fake", FakeQuantLinear(lin)), ("nf4", NF4Linear.from_linear(lin, compute_dtype=torch.float32))]


@pytest.mark.parametrize("kind", ["fake", "nf4"])
def test_qdora_on_quantized_base_matches_equation_on_dequantized_weight(kind):
    bases = dict(_quantized_bases())
    holder = nn.Sequential(bases[kind])
    lk.inject(holder, lk.AdapterConfig(method="dora", r=4, alpha=8, target_modules=["0"]))
    assert weight_access(holder[0].base).quantized
    ad = holder[0].adapters["default"]
    _randomize(holder, seed=2)
    x = torch.randn(5, 64)
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(holder[0].base.dense_weight(torch.float32))
        dense.bias.copy_(holder[0].base.bias)
    torch.testing.assert_close(holder(x), _equation(dense, ad, x), atol=1e-5, rtol=1e-5)


# ---- against the peer: PEFT's DoRA on identical weights ----

PEER_CASES = [
    ("tiny-llama", "causal-lm", ["q_proj", "v_proj"]),
    ("tiny-bert", "base", ["query", "value", "dense"]),
]


def _peft_pair(name, task, targets, dropout=0.0):
    peft = pytest.importorskip("peft")
    base = lk.build_model(name, task=task)
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=True,
        fan_in_fan_out=name == "tiny-gpt2",
    )
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = lk.inject(
        copy.deepcopy(base),
        lk.AdapterConfig(method="dora", r=4, alpha=8, dropout=dropout, target_modules=targets),
    )
    return pm, ours


def _peft_key(k: str) -> str:
    """PEFT's live state_dict name -> lorakit peft_state name (module path + PEFT's file key)."""
    return (
        k[len(PREFIX) :]
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    )


def _ours_state(ours):
    return {
        f"{lname}.{k}": v
        for lname, layer in ours.named_modules()
        if isinstance(layer, lk.AdaptedLayer)
        for k, v in layer.adapters["default"].peft_state().items()
    }


def _copy_peft_to_ours(pm, ours):
    state = {_peft_key(k): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(state) == set(_ours_state(ours))
    for lname, layer in ours.named_modules():
        if isinstance(layer, lk.AdaptedLayer):
            layer.adapters["default"].load_peft_state(
                {k[len(lname) + 1 :]: v for k, v in state.items() if k.startswith(lname + ".")}
            )


def _copy_ours_to_peft(ours, pm):
    state = _ours_state(ours)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_" in k:
                p.copy_(state[_peft_key(k)])


@pytest.mark.parametrize("name, task, targets", [*PEER_CASES, ("tiny-gpt2", "causal-lm", ["c_attn"])])
def test_same_logits_and_gradients_as_peft_both_directions(name, task, targets):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for direction in ("peft->lorakit", "lorakit->peft"):
        pm, ours = _peft_pair(name, task, targets)
        if direction == "peft->lorakit":
            _randomize(pm, seed=3)
            _copy_peft_to_ours(pm, ours)
        else:
            _randomize(ours, seed=4)
            _copy_ours_to_peft(ours, pm)
        pm.eval(), ours.eval()
        a, b = _logits(pm(input_ids=ids)), _logits(ours(input_ids=ids))
        assert (a - b).abs().max().item() <= 1e-5, direction
        with lk.disabled(ours):
            assert not torch.allclose(_logits(ours(input_ids=ids)), a, atol=1e-3)
        a.square().mean().backward()
        b.square().mean().backward()
        ours_grads = {k: v.grad for k, v in _ours_state(ours).items()}
        for k, p in pm.named_parameters():
            if "lora_" in k:
                torch.testing.assert_close(ours_grads[_peft_key(k)], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name, task, targets", PEER_CASES)
def test_training_with_dropout_matches_peft(name, task, targets):
    pm, ours = _peft_pair(name, task, targets, dropout=0.3)
    _randomize(pm, seed=5)
    _copy_peft_to_ours(pm, ours)
    pm.train(), ours.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    a = _logits(pm(input_ids=ids))
    torch.manual_seed(7)
    b = _logits(ours(input_ids=ids))
    assert (a - b).abs().max().item() <= 1e-5
    torch.manual_seed(8)  # and the dropout is really on: another mask gives other logits
    assert not torch.allclose(_logits(ours(input_ids=ids)), b, atol=1e-4)


def test_adapter_files_round_trip_with_peft(tmp_path):
    save, load = lk.save_adapter, lk.load_adapter
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    pm, ours = _peft_pair("tiny-llama", "causal-lm", ["q_proj", "v_proj"])
    _randomize(pm, seed=6)
    pm.save_pretrained(tmp_path / "from_peft")
    loaded = load(lk.build_model("tiny-llama", task="causal-lm"), str(tmp_path / "from_peft"))
    pm.eval(), loaded.eval()
    assert (_logits(pm(input_ids=ids)) - _logits(loaded(input_ids=ids))).abs().max().item() <= 1e-5
    _randomize(ours, seed=7)
    save(ours, str(tmp_path / "from_lorakit"))
    back = peft.PeftModel.from_pretrained(
        lk.build_model("tiny-llama", task="causal-lm"), tmp_path / "from_lorakit"
    )
    ours.eval(), back.eval()
    assert (_logits(ours(input_ids=ids)) - _logits(back(input_ids=ids))).abs().max().item() <= 1e-5
