"""AdaLoRA's init of P, Q (``init``: gaussian = PEFT's, orthogonal) and the singular values' rate
(``method_options.lambda_lr_ratio``): the bases are what each init says, the model starts at its base, and
Adam's first step moves λ by lr x ratio and P, Q by lr, in a bare loop and through the trainer."""


import pytest
import torch

import lorakit as lk
from adapters.adalora_helpers import TARGETS, adalora_model, token_batch
from helpers import trained_group_rates
from lorakit.adapters.adalora import AdaLoraController, AdaLoraLinear, adalora_layers
from lorakit.adapters.adalora_setup import DEFAULT_INIT, DEFAULT_LAMBDA_LR_RATIO
from lorakit.config import ConfigError
from lorakit.train.build import optimizer_groups


def _layers(model):
    return adalora_layers(model, "default")


def test_orthogonal_init_is_orthonormal_and_the_model_starts_at_its_base():
    ids = token_batch()
    base = lk.build_model("tiny-llama", seed=0).eval()
    model = adalora_model(init="orthogonal").eval()
    for path, a in _layers(model).items():
        r = a.init_r
        torch.testing.assert_close(a.lora_A @ a.lora_A.t(), torch.eye(r), atol=1e-5, rtol=0, msg=path)  # Q rows
        torch.testing.assert_close(a.lora_B.t() @ a.lora_B, torch.eye(r), atol=1e-5, rtol=0, msg=path)  # P cols
        assert torch.count_nonzero(a.lora_E) == 0 and torch.count_nonzero(a.delta_weight(None)) == 0
        assert a.orth_penalty().item() < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    ctl = AdaLoraController(model, total_step=10)
    assert ctl.orth_loss().item() < 1e-9  # the penalty starts at its minimum
    half = AdaLoraLinear(16, 8, 4, 8.0, dtype=torch.bfloat16, init="orthogonal")  # QR has no bf16 kernel
    torch.testing.assert_close(half.lora_A.float() @ half.lora_A.float().t(), torch.eye(4), atol=1e-2, rtol=0)


def test_gaussian_init_is_peft_s_and_default_is_the_stated_one():
    """PEFT's SVDLinear.reset_lora_parameters: λ = 0, A and B ~ N(0, 0.02)."""
    g = adalora_model(init="gaussian", init_r=64, target_modules=["q_proj"])
    for a in _layers(g).values():
        assert torch.count_nonzero(a.lora_E) == 0
        for t in (a.lora_A, a.lora_B):
            assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002
        assert abs(a.orth_penalty().item() - 2 * 64) < 0.1 * 2 * 64  # far from orthonormal: ~r per tensor
    d, named = adalora_model(init="default"), adalora_model(init=DEFAULT_INIT)
    for a, b in zip(_layers(d).values(), _layers(named).values()):
        for key in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=0)


def _names(model):
    return {id(p): n for n, p in model.named_parameters()}


def test_lambda_gets_ratio_times_the_rate_and_the_rest_the_plain_groups():
    model = adalora_model(init="gaussian", method_options={"lambda_lr_ratio": 10})
    groups = optimizer_groups(model, 0.1, 1e-3)
    names = _names(model)
    table = {g["name"]: (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups}
    assert {k: v[1:] for k, v in table.items()} == {"adalora_lambda": (1e-2, 0.1), "adalora_decay": (1e-3, 0.1)}
    assert all(n.endswith("lora_E") for n in table["adalora_lambda"][0])
    assert len(table["adalora_lambda"][0]) == len(_layers(model)) == len(table["adalora_decay"][0]) // 2
    plain = adalora_model(method_options={"lambda_lr_ratio": 1})
    assert all("lr" not in g for g in optimizer_groups(plain, 0.1, 1e-3))  # ratio 1: the trainer's plain groups


def test_first_adam_step_moves_lambda_by_lr_times_ratio_and_p_q_by_lr():
    """Adam's first step moves a parameter by lr * g / (|g| + eps), about lr wherever g is not tiny: so the
    largest move of λ is lr x ratio and of P, Q (whose gradient here is the penalty's) lr."""
    lr, ratio = 1e-3, 10.0
    model = adalora_model(init="gaussian", method_options={"lambda_lr_ratio": ratio})
    ctl = AdaLoraController(model, total_step=10)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0, lr), lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = token_batch()
    (model(ids, labels=ids).loss + ctl.orth_loss()).backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
    lam = max(v for n, v in moved.items() if n.endswith("lora_E"))
    pq = max(v for n, v in moved.items() if not n.endswith("lora_E"))
    assert lam == pytest.approx(lr * ratio, rel=1e-3) and pq == pytest.approx(lr, rel=1e-3)


def test_options_and_inits_are_checked():
    with pytest.raises(ConfigError, match="method_options.lambda_lr_ratio"):
        lk.AdapterConfig(method="adalora", method_options={"lambda_lr_ratio": 0})
    with pytest.raises(ConfigError, match="init='pissa' is not supported with method='adalora'"):
        lk.AdapterConfig(method="adalora", init="pissa")
    with pytest.raises(ConfigError, match="lambda_lr_ratio"):
        lk.AdapterConfig(method="lora", method_options={"lambda_lr_ratio": 10})
    assert lk.AdapterConfig(method="adalora").option("lambda_lr_ratio") == DEFAULT_LAMBDA_LR_RATIO


def test_the_trainer_uses_the_lambda_rate(tmp_path):
    adapter = {"method": "adalora", "init_r": 4, "target_r": 2, "target_modules": TARGETS,
               "method_options": {"lambda_lr_ratio": 8}}
    assert trained_group_rates(tmp_path, adapter) == [[1e-3, 8e-3]]
