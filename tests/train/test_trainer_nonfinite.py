"""Steps the trainer must not apply: a finite loss with non-finite gradients (an inf put into one gradient
by a hook on a real run), fp16 loss-scale overflows, and AdaLoRA's final masking when its step is skipped."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lorakit.adapters.adalora_budget import BudgetSchedule
from lorakit.train.callbacks import Callback
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint
from lorakit.train.config import RunConfig
from lorakit.train.trainer import NonFiniteLossError, train

from .test_trainer import NaNLoss, adapter_tensors, losses, run_config, with_output

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class InfGrad(Callback):
    """Puts inf into one element of one adapter gradient during the backward of the steps ``at``
    (a tensor hook: the loss stays finite), and records what each step started from and ended with."""

    def __init__(self, at) -> None:
        self.at, self.state = at, None
        self.start: dict[int, dict] = {}  # completed steps -> (params, Adam step counts) at the next backward
        self.end: dict[int, dict] = {}  # step -> (params, Adam step counts) after it

    def on_train_begin(self, state) -> None:
        self.state = state
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self.params[0].register_hook(self._hook)

    def _hook(self, g: torch.Tensor) -> torch.Tensor:
        if self.state.step + 1 in self.at:  # state.step counts completed steps
            g = g.clone()
            g.view(-1)[0] = float("inf")
        return g

    def _snap(self, state) -> dict:
        opt = state.optimizer
        return {
            "params": [p.detach().clone() for p in self.params],
            "adam_steps": [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in self.params],
        }

    def on_after_backward(self, state) -> None:
        self.start[state.step] = self._snap(state)

    def on_step_end(self, state) -> None:
        self.end[state.step] = self._snap(state)


def lrs(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["lr"] for r in map(json.loads, f) if "lr" in r]


def test_inf_gradient_with_finite_loss_is_skipped_like_a_nan_loss(tmp_path, capfd):
    cfg = run_config(tmp_path, max_steps=6)
    spy = InfGrad(at={3})
    res = train(with_output(cfg, dir=str(tmp_path / "inf")), callbacks=[spy])
    assert "step 3: gradient norm is not finite" in capfd.readouterr().err
    assert res.steps == 6 and res.skipped_steps == 1 and res.summary["skipped_steps"] == 1
    # step 3 changed nothing: step 4 starts from the parameters and Adam state step 2 ended with
    assert 3 not in spy.end
    for a, b in zip(spy.end[2]["params"], spy.start[3]["params"]):
        assert torch.equal(a, b)
    assert spy.start[3]["adam_steps"] == spy.end[2]["adam_steps"] == [2.0] * len(spy.params)
    assert spy.end[4]["adam_steps"] == [3.0] * len(spy.params)
    inf_out = str(tmp_path / "inf")
    assert all(torch.isfinite(t).all() for t in adapter_tensors(inf_out).values())
    # the same run with a NaN loss at step 3 instead: the same skip, so the same lr schedule and adapter
    nan = train(with_output(cfg, dir=str(tmp_path / "nan")), callbacks=[NaNLoss(lambda s: s == 2)])
    assert nan.skipped_steps == 1
    assert lrs(inf_out) == lrs(nan.output_dir)
    la, lb = losses(inf_out), losses(nan.output_dir)
    assert la[:2] + la[3:] == lb[:2] + lb[3:]  # step 3's loss is finite in one run, NaN in the other
    ta, tb = adapter_tensors(inf_out), adapter_tensors(nan.output_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_consecutive_inf_gradients_stop_the_run(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=9, max_nonfinite=3), save_every=2)
    with pytest.raises(NonFiniteLossError, match="gradient norm was not finite for 3 steps in a row"):
        train(cfg, callbacks=[InfGrad(at={5, 6, 7})])
    assert [s for s, _ in list_checkpoints(cfg.output.dir + "/checkpoints")] == [4, 6]  # keep_last 2


def _scaled_run(tmp_path, monkeypatch, init_scale: float, at: set[int], out: str):
    """A CPU run with a GradScaler (fp32 compute, as the fp16 path scales it) starting at ``init_scale``."""
    import lorakit.train.trainer as trainer
    from lorakit.train.build import Precision

    monkeypatch.setattr(trainer, "resolve_precision", lambda mode, device: Precision("fp16", None, True))
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init_scale))
    cfg = with_output(run_config(tmp_path, out, max_steps=7, max_nonfinite=3), save_every=7)
    return train(cfg, callbacks=[InfGrad(at=at)])


def test_fp16_scale_overflows_back_off_without_stopping_the_run(tmp_path, monkeypatch, capfd):
    res = _scaled_run(tmp_path, monkeypatch, 16.0, {2, 3, 4, 5}, "scaled")  # 4 in a row > max_nonfinite
    assert res.steps == 7 and res.skipped_steps == 4
    assert "fp16 gradients overflowed at loss scale 16 (now 8)" in capfd.readouterr().err
    (ckpt,) = list_checkpoints(res.output_dir + "/checkpoints")
    from lorakit.models import build_model
    from lorakit.surgery.inject import inject

    state = load_checkpoint(ckpt[1], inject(build_model("tiny-llama"), RunConfig.from_dict(
        json.load(open(os.path.join(res.output_dir, "run_config.json")))).adapter))
    assert state["scaler"]["scale"] == 1.0  # halved once per overflow, 16 -> 1


def test_fp16_overflow_at_scale_one_counts_as_non_finite(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        _scaled_run(tmp_path, monkeypatch, 1.0, {2, 3, 4}, "unit")


@pytest.mark.parametrize("skip", ["loss", "grad"])
@pytest.mark.parametrize("tfinal", [2, 0])  # 0: the final masking is due at the last step
def test_adalora_final_budget_enforced_when_its_step_is_skipped(tmp_path, tfinal, skip):
    T, n, init_r, target_r = 8, 4, 6, 3  # tiny-llama: 2 layers x (q_proj, v_proj)
    sched = BudgetSchedule(init_r * n, target_r * n, 2, tfinal, T, delta_t=4)
    final = sched.final_step
    last_before = max(t for t in range(1, final) if sched.is_masking_step(t))
    assert sched.budget(last_before) > target_r * n  # so a missed final masking shows in the ranks
    base = run_config(tmp_path, max_steps=T)
    cfg = RunConfig.from_dict({
        **base.to_dict(),
        "adapter": {"method": "adalora", "init_r": init_r, "target_r": target_r, "tinit": 2, "tfinal": tfinal,
                    "delta_t": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    })
    cb = InfGrad(at={final}) if skip == "grad" else NaNLoss(lambda s: s + 1 == final)
    res = train(cfg, callbacks=[cb])
    assert res.skipped_steps == 1
    adapter = os.path.join(res.output_dir, "adapter")
    pattern = json.load(open(os.path.join(adapter, "adapter_config.json")))["rank_pattern"]
    assert len(pattern) == n and sum(sum(v) for v in pattern.values()) == target_r * n
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    kept = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")]
    assert len(kept) == n and sum(kept) == target_r * n
    assert all(torch.isfinite(t).all() for t in tensors.values())
