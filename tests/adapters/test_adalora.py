"""AdaLoRA layer: the equation written out, PEFT's SVDLinear on the same weights, pruned save/load and
PEFT interop both ways, rank report."""

import json

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from helpers import logits_of
from lorakit.adapters.adalora import AdaLoraController, AdaLoraLinear, rank_pattern
from lorakit.bench.adalora_report import rank_report
from lorakit.io import load_adapter, save_adapter
from lorakit.weights import weight_access

TARGETS = ["q_proj", "v_proj"]


def _pruned_model(seed=0, zero_module=False):
    """tiny-llama with an AdaLoRA adapter (init_r 6) whose λ are non-zero and whose ranks are pruned."""
    torch.manual_seed(seed)
    m = lk.build_model("tiny-llama", seed=0)
    lk.inject(
        m,
        lk.AdapterConfig(
            method="adalora", init_r=6, target_r=3, total_step=20, target_modules=TARGETS, alpha=8.0
        ),
    )
    g = torch.Generator().manual_seed(seed + 1)
    layers = AdaLoraController(m).layers
    with torch.no_grad():
        for i, a in enumerate(layers.values()):
            a.lora_E.copy_(torch.randn(6, 1, generator=g))
            keep = torch.rand(6, generator=g) > 0.45
            keep[i % 6] = True
            if zero_module and i == 1:
                keep[:] = False
            a.apply_mask(keep)
    return m


X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))


def test_forward_equals_equation_and_delta_weight():
    lin = torch.nn.Linear(10, 7)
    a = AdaLoraLinear(10, 7, init_r=4, alpha=6.0)
    with torch.no_grad():
        a.lora_E.copy_(torch.randn(4, 1))
    a.apply_mask(torch.tensor([True, False, True, True]))
    x = torch.randn(3, 10)
    p, lam, q = a.lora_B, a.lora_E.view(-1) * torch.tensor([1.0, 0, 1, 1]), a.lora_A
    want = lin(x) + (6.0 / (4 + 1e-5)) * x @ (p @ torch.diag(lam) @ q).T  # h = W0 x + alpha/ranknum P Λ Q x
    torch.testing.assert_close(a(x, lin(x), weight_access(lin)), want)
    torch.testing.assert_close(
        a.delta_weight(weight_access(lin)), (6.0 / (4 + 1e-5)) * p @ torch.diag(lam) @ q
    )
    assert a.r == 3 and a.lora_E[1].item() == 0.0


def test_lorakit_forward_equals_peft_svdlinear_on_same_weights():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        lk.build_model("tiny-llama", seed=0),
        peft.AdaLoraConfig(init_r=6, target_r=3, total_step=20, target_modules=TARGETS, lora_alpha=8),
    )
    ours = _pruned_model()
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for path, a in AdaLoraController(ours).layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                theirs[f"{path}.{key}.default"].copy_(getattr(a, key))
        torch.testing.assert_close(logits_of(ours(X)), logits_of(pm(X)), rtol=0, atol=1e-5)


def test_save_keeps_only_kept_ranks_and_loads_back_identical(tmp_path):
    m = _pruned_model(zero_module=True)
    with torch.no_grad():
        masked = logits_of(m(X))
    kept = AdaLoraController(m).finalize()  # what the trainer's callback does at the end of training
    pattern = rank_pattern(m)
    with torch.no_grad():
        ref = logits_of(m(X))  # the pruned terms were exact zeros: only the summation order changed
    torch.testing.assert_close(ref, masked, rtol=0, atol=1e-6)
    save_adapter(m, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for path, k in kept.items():  # only the kept ranks are stored
        assert shapes[f"base_model.model.{path}.lora_E"] == (k, 1)
        assert (
            shapes[f"base_model.model.{path}.lora_A"][0] == k == shapes[f"base_model.model.{path}.lora_B"][1]
        )
    assert sum(kept.values()) < 6 * len(kept) and 0 in kept.values()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == pattern and saved["total_step"] == 20
    loaded = load_adapter(lk.build_model("tiny-llama", seed=0), tmp_path)
    with torch.no_grad():
        assert torch.equal(logits_of(loaded(X)), ref)
    assert rank_pattern(loaded) == pattern  # mask positions survive, so a re-save is identical
    layers = AdaLoraController(loaded).layers
    assert all(a.compact for p, a in layers.items() if kept[p] < 6) and all(
        a.ranknum == 6.0 for a in layers.values()
    )


def test_peft_adalora_file_loads_into_lorakit(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        lk.build_model("tiny-llama", seed=0),
        peft.AdaLoraConfig(init_r=6, target_r=3, total_step=20, target_modules=TARGETS, lora_alpha=8),
    )
    g = torch.Generator().manual_seed(3)
    masks = {}
    with torch.no_grad():
        for n, p in pm.base_model.model.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=g))  # non-zero singular values
                keep = torch.rand(6, generator=g) > 0.4
                p.masked_fill_(~keep.view(-1, 1), 0.0)
                masks[n] = keep.tolist()
    pm.base_model.peft_config["default"].rank_pattern = masks  # what update_and_allocate records
    with torch.no_grad():
        ref = logits_of(pm.eval()(X))
    pm.save_pretrained(tmp_path)
    model = load_adapter(lk.build_model("tiny-llama", seed=0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(X)), ref, rtol=0, atol=1e-5)
    assert {f"{k}.lora_E.default": v for k, v in _masks(model).items()} == masks


def _masks(model):
    return {k.removesuffix(".lora_E"): v for k, v in rank_pattern(model).items()}


def test_lorakit_adapter_loads_into_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = _pruned_model(seed=2, zero_module=True)  # one matrix keeps no rank at all
    AdaLoraController(m).finalize()
    with torch.no_grad():
        ref = logits_of(m(X))
    save_adapter(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(lk.build_model("tiny-llama", seed=0), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pm(X)), ref, rtol=0, atol=1e-5)


def test_rank_report_table_and_heatmap(tmp_path):
    m = _pruned_model()
    rep = rank_report(m)
    assert rep.total == sum(a.r for a in AdaLoraController(m).layers.values())
    assert "model.layers.1.self_attn.v_proj" in rep.table()
    layers, kinds, cells = rep.grid()
    assert layers == [0, 1] and kinds == ["self_attn.q_proj", "self_attn.v_proj"]
    assert cells[1][1] == AdaLoraController(m).layers["model.layers.1.self_attn.v_proj"].r
    path = rep.heatmap(str(tmp_path / "ranks.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_load_errors_name_the_tensor():
    a = AdaLoraLinear(5, 4, init_r=3, alpha=1.0)
    good = {"lora_A": torch.zeros(2, 5), "lora_E": torch.zeros(2, 1), "lora_B": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"lora_E: 4 ranks stored but init_r=3"):
        a.load_peft_state(
            {"lora_A": torch.zeros(4, 5), "lora_E": torch.zeros(4, 1), "lora_B": torch.zeros(4, 4)}
        )
    with pytest.raises(
        ValueError, match=r"adalora.lora_B: shape \(4, 3\) does not match the model's \(4, 2\)"
    ):
        a.load_peft_state({**good, "lora_B": torch.zeros(4, 3)})
    with pytest.raises(KeyError, match=r"missing tensors \['lora_E'\]"):
        a.load_peft_state({k: v for k, v in good.items() if k != "lora_E"})
    with pytest.raises(
        ValueError, match="rank_pattern entry has 3 entries with 1 kept; expected 3 entries with 2"
    ):
        a.load_peft_state(good, rank_mask=[True, False, False])
    a.load_peft_state(good, rank_mask=[True, False, True])
    assert a.compact and a.rank_mask.tolist() == [True, False, True] and a.lora_A.shape == (2, 5)
