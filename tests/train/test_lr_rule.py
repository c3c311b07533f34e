"""training.lr: auto — the rule written out, its config errors, the trainer using and recording it, and
compare choosing it per method unless an lr is set."""

import json

import pytest
import torch

from lorakit.config import ConfigError
from lorakit.recipes.compare import derive_configs, lr_is_set
from lorakit.train.config import RunConfig
from lorakit.train.lr_rule import auto_lr


def _rule(base: float, n: int, top: float = 3e-3) -> float:
    """The docstring's rule, written out independently."""
    raw = base * (22.7e6 / n) ** (1 / 3)
    return float(f"{min(top, max(1e-5, raw)):.2g}")


@pytest.mark.parametrize("n", [22_700_000, 124_224, 7_000_000_000, 65_000_000_000, 350_000_000])
def test_rule_by_method_and_size(n):
    for method, base in ((None, 2e-4), ("lora", 1e-3), ("dora", 1e-3)):
        assert auto_lr(method, n).lr == _rule(base, n), (method, n)
    assert auto_lr("adalora", n).lr == _rule(1e-2, n, top=3e-2), n


def test_adalora_gets_ten_times_the_adapter_rate():
    """AdaLoRA's singular values start at 0 and Adam moves each by about lr per step: at LoRA's rate it
    stayed at chance on MiniLM + SST-2 (benchmarks/results/adalora.md), so auto gives it 10x."""
    ada, lora = auto_lr("adalora", 22_700_000), auto_lr("lora", 22_700_000)
    assert (ada.lr, lora.lr) == (1e-2, 1e-3) and "AdaLoRA" in ada.why
    assert auto_lr("adalora", 1000).lr == 3e-2  # its own clamp: 3x its base, as 3e-3 is for the others
    assert auto_lr("adalora", 22_700_000, quantized=True).lr == 1e-2


def test_anchor_values_and_why():
    full, lora = auto_lr(None, 22_700_000), auto_lr("lora", 22_700_000)
    assert (full.lr, lora.lr) == (2e-4, 1e-3)  # the measured MiniLM pattern: full about 5x lower
    assert auto_lr("lora", 7_000_000_000).lr == 1.5e-4 and auto_lr(None, 7_000_000_000).lr == 3e-5
    tiny = auto_lr("lora", 1000)
    assert tiny.lr == 3e-3 and "clamped" in tiny.why
    q = auto_lr("lora", 22_700_000, quantized=True)
    assert q.setup == "lora+nf4" and q.lr == 1e-3 and "22.7M" in q.why
    assert set(full.as_dict()) == {"lr", "setup", "base_params", "rule", "why"}
    with pytest.raises(ValueError, match="0 parameters"):
        auto_lr("lora", 0)


def _raw(tmp_path, **training):
    return {"model": {"name": "tiny-llama"}, "data": {"train": str(tmp_path / "x.jsonl")},
            "output": {"dir": str(tmp_path / "out")}, "training": training}


@pytest.mark.parametrize("bad, match", [("fast", "training.lr='fast' is invalid; expected a positive number"),
                                        (0, "training.lr=0"), (-1e-3, "training.lr=-0.001")])
def test_config_accepts_auto_and_refuses_other_values(tmp_path, bad, match):
    assert RunConfig.from_dict(_raw(tmp_path, lr="auto")).training.lr == "auto"
    assert RunConfig.from_dict(_raw(tmp_path, lr="2e-4")).training.lr == 2e-4
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(_raw(tmp_path, lr=bad))


def test_trainer_uses_and_records_the_auto_rate(tmp_path):
    from lorakit.train.trainer import train

    data = tmp_path / "x.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    raw = _raw(tmp_path, lr="auto", max_steps=2, batch_size=4, grad_accumulation=1, num_workers=0,
               gradient_checkpointing=False, eval_at_start=False, warmup_ratio=0.0, schedule="constant")
    raw["adapter"] = {"target_modules": ["q_proj", "v_proj"]}
    raw["output"].update(save_every=0, plot=False, progress=False)
    seen = []

    from lorakit.train.callbacks import Callback

    class Lr(Callback):
        def on_step_end(self, state):
            seen.append(state.optimizer.param_groups[0]["lr"])

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(RunConfig.from_dict(raw), overwrite=True, callbacks=[Lr()])
    finally:
        torch.set_num_threads(n)
    rec = res.summary["lr_auto"]
    assert rec["lr"] == auto_lr("lora", rec["base_params"]).lr == seen[0] == seen[1]
    assert rec["setup"] == "lora" and "22.7M" in rec["why"]
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f)["lr_auto"] == rec


def test_compare_uses_auto_per_method_unless_an_lr_is_set(tmp_path):
    base = {"model": {"name": "m"}, "adapter": {"r": 8}, "training": {"lr": 1e-3}}
    d = derive_configs(base, ["full", "lora"])
    assert d["full"]["training"]["lr"] == d["lora"]["training"]["lr"] == "auto"
    kept = derive_configs(base, ["full", "lora"], lr=None)
    assert kept["full"]["training"]["lr"] == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: m}\ntraining: {epochs: 1}\n")
    assert not lr_is_set(str(path), []) and lr_is_set(str(path), ["training.lr=5e-4"])
    path.write_text("model: {name: m}\ntraining: {lr: 1.0e-3}\n")
    assert lr_is_set(str(path), []) and not lr_is_set(None, ["training.epochs=2"])
