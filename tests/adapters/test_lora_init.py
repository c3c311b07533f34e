"""LoRA initialisations that change the base weight (PiSSA, OLoRA) or start from the quantization error
(LoftQ), checked against PEFT 0.21 on the same weights, and their files checked on a fresh base.

A base-changing init trains on the residual W - s B0 A0 (PEFT writes it into the base weight; lorakit
leaves W alone and the adapter subtracts s B0 A0 x); its saved file must be right on the unchanged base, so it is written as PEFT's ``path_initial_model_for_weight_conversion`` writes it:
a rank-2r LoRA [A | A0], [B | -B0] with ``init_lora_weights: true``. The round trips below load that
file on a fresh base three ways: lorakit, PEFT, and a plain "vLLM-style" consumer that only adds
(alpha / r) B A to each weight.
"""

import json
import math
import warnings

import pytest
import torch

import lorakit as lk
from helpers import assert_residual_init_equals_peft, logits_of, perturb, plain_consumer
from lorakit.io import load_adapter, save_adapter

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*changes the base weights.*")

X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model_of(name="tiny-llama", task="causal-lm", seed=0):
    return lk.build_model(name, task=task, seed=seed).float()


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
@pytest.mark.parametrize(("init", "use_rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
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
    assert_residual_init_equals_peft(mine, theirs, model_of())
    with torch.no_grad():
        torch.testing.assert_close(logits_of(mine(X)), logits_of(theirs(X)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_unconverted_file_loads_by_redoing_the_init(init, tmp_path):
    """PEFT's own save (init_lora_weights=init, no conversion) expects the init redone on the base."""
    theirs = peft.get_peft_model(
        model_of(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = logits_of(theirs.eval()(X))
        torch.testing.assert_close(logits_of(load_adapter(model_of(), tmp_path)(X)), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- LoftQ
def peft_loftq_on_cpu():
    """PEFT's own ``loftq_init``, with its hard-coded compute device "cuda" swapped for "cpu" (a code
    constant; nothing else changed): bitsandbytes quantizes NF4 on the CPU."""
    import types

    from peft.utils import loftq_utils

    f = loftq_utils.loftq_init.__wrapped__  # below torch.no_grad
    consts = tuple("cpu" if c == "cuda" else c for c in f.__code__.co_consts)
    return torch.no_grad()(types.FunctionType(f.__code__.replace(co_consts=consts), f.__globals__))


def loftq_layer(w, r, alpha, **quant):
    """A one-layer model, NF4-quantized (no double quant: PEFT's LoftQ uses none), with LoftQ's adapter."""
    from lorakit.adapters.lora_init import full_precision
    from lorakit.config import QuantConfig
    from lorakit.quant import quantize

    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quantize(model, QuantConfig(double_quant=False, compute_dtype="fp32", **quant))
    with full_precision({"0": w}):
        lk.inject(model, lk.AdapterConfig(init="loftq", r=r, alpha=alpha, target_modules=["0"]))
    layer = model[0]
    adapter = layer.adapters["default"]
    return layer.access.dense_weight(torch.float32), adapter.delta_weight(layer.access)


def test_loftq_removes_quantization_error_like_peft_on_a_known_matrix():
    """||W - Q|| and ||W - (Q + s B A)|| for lorakit (its NF4 as Q) and PEFT's loftq_init, same W,
    side by side; both reach the written-out optimum ||W - Q||^2 - sum of the top-r sigma_i(W - Q)^2."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * 0.02 + 0.01 * torch.randn(128, 4, generator=g) @ torch.randn(4, 256, generator=g)
    r = 8
    q, delta = loftq_layer(w, r, alpha=32)  # alpha != r: scaling 4, which lorakit's factors account for
    mine = ((w - q).norm().item(), (w - q - delta).norm().item())
    deq, a, b = peft_loftq_on_cpu()(w, num_bits=4, reduced_rank=r, num_iter=1)
    theirs = ((w - deq).norm().item(), (w - deq - b @ a).norm().item())  # PEFT's factors assume scaling 1
    s = torch.linalg.svdvals(w - q)
    optimum = math.sqrt(mine[0] ** 2 - (s[:r] ** 2).sum().item())
    print(f"\n||W-Q||, ||W-(Q+sBA)||: lorakit {mine}, PEFT {theirs}, optimum after {optimum:.6g}")
    assert mine[1] < 0.95 * mine[0]  # LoftQ removed part of the error (about 10% here: r=8 of 128 directions)
    assert mine[0] == pytest.approx(theirs[0], rel=1e-6)  # the same NF4 quantization
    assert mine[1] == pytest.approx(theirs[1], rel=1e-4)
    assert mine[1] == pytest.approx(optimum, rel=1e-4)


def qlora_model(init, double_quant=True, r=16):
    from lorakit.adapters.lora_init import dense_weights, full_precision
    from lorakit.config import QuantConfig
    from lorakit.quant import eligible_layers, quantize

    qcfg = QuantConfig(compute_dtype="fp32", double_quant=double_quant)
    model = model_of()
    dense = dense_weights(eligible_layers(model, qcfg))
    quantize(model, qcfg)
    with full_precision(dense):
        lk.inject(model, lk.AdapterConfig(init=init, r=r, alpha=8, target_modules="all-linear"))
    return model, qcfg


def test_loftq_starts_closer_to_full_precision_and_its_file_is_right_on_a_fresh_quantized_base(tmp_path):
    from lorakit.quant import dequantize_model, quantize

    with torch.no_grad():
        full = logits_of(model_of()(X))
        gaps = {}
        for init in ("default", "loftq"):
            model, qcfg = qlora_model(init)
            gaps[init] = (logits_of(model(X)) - full).norm().item()
    print(f"\n||logits - fp32 logits|| at the start: {gaps}")
    assert gaps["loftq"] < 0.9 * gaps["default"], gaps  # QLoRA starts closer to the fp32 model
    perturb(model)
    with torch.no_grad():
        ref = logits_of(model(X))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is True
    fresh = quantize(model_of(), qcfg)  # the unchanged base, quantized as the run's quant section says
    with torch.no_grad():
        torch.testing.assert_close(logits_of(load_adapter(fresh, tmp_path)(X)), ref, rtol=1e-5, atol=1e-5)
        dense = dequantize_model(quantize(model_of(), qcfg), torch.float32)
        torch.testing.assert_close(logits_of(plain_consumer(dense, tmp_path)(X)), ref, rtol=1e-5, atol=1e-5)
        dense = dequantize_model(quantize(model_of(), qcfg), torch.float32)
        theirs = peft.PeftModel.from_pretrained(dense, tmp_path).eval()
        torch.testing.assert_close(logits_of(theirs(X)), ref, rtol=1e-5, atol=1e-5)


def test_the_trainer_fits_loftq_to_its_quant_section(tmp_path):
    """build_run_model keeps W for LoftQ before quantizing: its adapter equals the one built by hand."""
    from lorakit.train.build import Precision, build_run_model
    from lorakit.train.config import RunConfig

    cfg = RunConfig.from_dict({
        "model": {"name": "tiny-llama"}, "data": {"train": "unused.jsonl"},
        "adapter": {"init": "loftq", "r": 16, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "quant": {"compute_dtype": "fp32"}, "output": {"dir": str(tmp_path / "out")},
    })
    model = build_run_model(cfg, 2, 256, Precision("fp32", None, False), torch.device("cpu"))
    by_hand, _ = qlora_model("loftq")
    mine, ref = lk.io.adapter_state(model), lk.io.adapter_state(by_hand)
    assert sorted(mine) == sorted(ref)
    for key, t in ref.items():
        torch.testing.assert_close(mine[key], t, rtol=1e-5, atol=1e-6, msg=key)
    assert max(t.abs().max().item() for k, t in mine.items() if "lora_B" in k) > 1e-3  # not B = 0


def test_loftq_errors_are_one_line():
    from lorakit.config import ConfigError, QuantConfig
    from lorakit.quant import quantize
    from lorakit.train.config import RunConfig

    model = quantize(model_of(), QuantConfig())
    with pytest.raises(ConfigError, match=r"init='loftq' needs the full-precision weight of 'model\.layers\.0"):
        lk.inject(model, lk.AdapterConfig(init="loftq", target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="adapter.init='loftq' .* add a quant section"):
        RunConfig.from_dict({"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"},
                             "adapter": {"init": "loftq"}, "output": {"dir": "out"}})
    with pytest.raises(ConfigError, match="init='olora' needs a dense linear base"):
        lk.inject(model, lk.AdapterConfig(init="olora", target_modules=["q_proj"]))


# ------------------------------------------------- the real base, wherever the adapter is not applied
def _fresh_weights():
    return {k: v for k, v in model_of().state_dict().items()}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_disabled_other_adapter_delete_and_unload_see_the_original_base(init, tmp_path):
    """A base-changing init must not leave its residual W - s B0 A0 where the adapter is not applied:
    under ``disabled``, with another adapter active, after ``delete_adapter`` and ``unload(merge=False)``
    the model is the original base; ``unload(merge=True)`` gives the adapted model."""
    with torch.no_grad():
        base = logits_of(model_of()(X))
    model, ref = trained(init)
    with torch.no_grad(), lk.disabled(model):
        torch.testing.assert_close(logits_of(model(X)), base, rtol=1e-5, atol=1e-5)

    alone = lk.inject(model_of(), lk.AdapterConfig(r=2, target_modules=["q_proj"]), "b")
    perturb(alone, seed=3)
    save_adapter(alone, tmp_path / "b", adapter_name="b")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        lk.set_adapter(model, "b")
        torch.testing.assert_close(logits_of(model(X)), logits_of(alone(X)), rtol=1e-5, atol=1e-5)
        lk.set_adapter(model, "default")
        torch.testing.assert_close(logits_of(model(X)), ref, rtol=1e-5, atol=1e-5)

    lk.delete_adapter(model, "b")
    lk.delete_adapter(model, "default")
    fresh = _fresh_weights()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fresh[k], rtol=1e-5, atol=1e-6, msg=k)

    for merge in (False, True):
        model, ref = trained(init)
        lk.unload(model, merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(logits_of(model(X)), ref if merge else base, rtol=1e-5, atol=1e-5)
