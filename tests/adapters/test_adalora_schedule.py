"""AdaLoRA's schedule as fractions of the run, resolved once T is known, and the orthogonal penalty's two
forms: the squared one written out, and PEFT's, whose training trajectory equals PEFT's step for step."""

import json

import pytest
import torch

import lorakit as lk
from adapters.adalora_helpers import TARGETS
from adapters.adalora_helpers import adalora_model as _model
from adapters.adalora_helpers import token_batch as _batch
from lorakit.adapters.adalora import AdaLoraController
from lorakit.adapters.adalora_budget import resolve_schedule
from lorakit.adapters.base import method_callbacks
from lorakit.bench.adalora_report import rank_report
from lorakit.config import ConfigError
from lorakit.train.callbacks import TrainState


def test_fractions_resolve_to_steps_and_ints_pass_through():
    assert resolve_schedule(0.1, 0.4, 0.01, 200) == (20, 80, 2)
    assert resolve_schedule(0.1, 0.4, 0.01, 37) == (4, 15, 1)  # round(3.7), round(14.8), at least 1
    assert resolve_schedule(10, 0.25, 3, 100) == (10, 25, 3)  # a step count and a fraction mixed
    assert resolve_schedule(0, 0, 1, 5) == (0, 0, 1)
    with pytest.raises(ConfigError, match=r"total_step=10 is too small.*= 5 \+ 5 \(from tinit=0.5, tfinal=5\)"):
        resolve_schedule(0.5, 5, 1, 10)


def test_defaults_are_fractions_of_the_run():
    cfg = lk.AdapterConfig(method="adalora")
    assert (cfg.tinit, cfg.tfinal, cfg.delta_t) == (0.1, 0.4, 0.01)
    m = _model()
    (cb,) = method_callbacks(m)
    state = TrainState(model=m, total_steps=250)
    cb.on_train_begin(state)
    s = cb.controller.schedule
    assert (s.tinit, s.tfinal, s.delta_t, s.total_step, s.final_step) == (25, 100, 2, 250, 150)
    saved = lk.adapter_configs(m)["default"]  # the steps it runs with, written with the adapter
    assert (saved.tinit, saved.tfinal, saved.delta_t, saved.total_step) == (25, 100, 2, 250)
    assert all(type(v) is int for v in (saved.tinit, saved.tfinal, saved.delta_t))
    summary = state.summary["adalora_schedule"]
    assert summary["tinit"] == 25 and summary["final_masking_step"] == 150 and summary["orth_form"] == "squared"
    assert summary["init_budget"] == 6 * 4 and summary["target_budget"] == 3 * 4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tinit=1.0), r"tinit=1.0 is invalid; a float is a fraction of the total steps and must be in \(0, 1\)"),
        (dict(tfinal=1.5), r"tfinal=1.5 is invalid; a float is a fraction"),
        (dict(delta_t=0.0), r"delta_t=0.0 is invalid"),
        (dict(tinit=-0.1), r"tinit=-0.1 is invalid"),
        (dict(tinit=-1), r"tinit=-1 is invalid; expected a non-negative integer"),
        (dict(tinit=True), r"tinit=True is invalid"),
        (dict(tinit=0.6, tfinal=0.4), r"tinit=0.6 \+ tfinal=0.4 cover all the steps"),
        (dict(tinit=0.5, tfinal=0.49, total_step=10), r"total_step=10 is too small"),
        (dict(method_options={"orth_form": "frobenius"}), r"method_options.orth_form='frobenius' is not supported"),
    ],
)
def test_schedule_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        lk.AdapterConfig(method="adalora", **kw)


def test_zero_float_is_zero_steps_and_yaml_run_config_accepts_fractions():
    assert lk.AdapterConfig(method="adalora", tinit=0.0, tfinal=0.25).tinit == 0.0
    from lorakit.train.config import RunConfig

    cfg = RunConfig.from_dict(
        {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}, "output": {"dir": "out"},
         "adapter": {"method": "adalora", "tinit": 0.2, "tfinal": 0.3, "delta_t": 5}}
    )
    assert (cfg.adapter.tinit, cfg.adapter.tfinal, cfg.adapter.delta_t) == (0.2, 0.3, 5)


def test_unresolved_fractions_round_trip_through_the_file_and_peft_loads_it(tmp_path):
    m = _model(tinit=0.2, tfinal=0.3)
    lk.save_adapter(m, str(tmp_path / "a"))
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (raw["tinit"], raw["tfinal"], raw["deltaT"], raw["total_step"]) == (0.2, 0.3, 0.01, 1)
    back = lk.load_adapter(lk.build_model("tiny-llama", seed=0), str(tmp_path / "a"))
    cfg = lk.adapter_configs(back)["default"]
    assert (cfg.tinit, cfg.tfinal, cfg.delta_t, cfg.total_step) == (0.2, 0.3, 0.01, None)
    peft = pytest.importorskip("peft")
    peft.PeftModel.from_pretrained(lk.build_model("tiny-llama", seed=0), str(tmp_path / "a"))


def test_rank_report_names_the_resolved_schedule():
    m = _model(tinit=0.25, tfinal=0.25, delta_t=1)
    AdaLoraController(m, total_step=8)
    assert "schedule: total_step 8, tinit 2, tfinal 2, delta_t 1" in rank_report(m).table()


def _peft_pair(tinit, tfinal, T, orth_reg_weight):
    """A PEFT AdaLoRA model and a lorakit one (orth_form 'peft') with the same weights (λ random)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pcfg = peft.AdaLoraConfig(
        init_r=6, target_r=3, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=T, target_modules=TARGETS,
        lora_alpha=8, orth_reg_weight=orth_reg_weight, task_type="CAUSAL_LM",  # its forward adds the penalty
    )
    pm = peft.get_peft_model(lk.build_model("tiny-llama", seed=0), pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(std=0.1)
    ours = _model(tinit=tinit, tfinal=tfinal, delta_t=1, total_step=T, orth_reg_weight=orth_reg_weight,
                  method_options={"orth_form": "peft"})
    theirs = {n: p for n, p in pm.base_model.model.named_parameters() if "lora_" in n}
    ctl = AdaLoraController(ours)
    with torch.no_grad():
        for path, a in ctl.layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(a, key).copy_(theirs[f"{path}.{key}.default"])
    return pm, theirs, ours, ctl


def test_peft_orth_form_follows_peft_trajectory_step_for_step():
    """Same weights, data and optimizer: lorakit with orth_form='peft' (loss + ctl.orth_loss(), ctl.step)
    and PEFT (its forward adds the penalty; update_and_allocate) end with the same weights and masks."""
    T = 10
    pm, theirs, ours, ctl = _peft_pair(tinit=2, tfinal=3, T=T, orth_reg_weight=0.5)
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for t in range(1, T + 1):
        ids = _batch(t)
        loss_p = pm(input_ids=ids, labels=ids).loss
        loss_o = ours(input_ids=ids, labels=ids).loss + ctl.orth_loss()
        torch.testing.assert_close(loss_o, loss_p, atol=1e-5, rtol=1e-5)
        loss_p.backward()
        loss_o.backward()
        opt_p.step()
        opt_o.step()
        pm.base_model.update_and_allocate(t)
        ctl.step(t)
        opt_p.zero_grad()
        opt_o.zero_grad()
    for path, a in ctl.layers.items():
        for key in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(a, key), theirs[f"{path}.{key}.default"], atol=1e-5, rtol=1e-5)
        kept = pm.peft_config["default"].rank_pattern[f"{path}.lora_E.default"]
        assert a.rank_mask.tolist() == kept
    assert sum(ctl.ranks().values()) == 3 * 4


def test_squared_form_by_hand_and_differs_from_peft_form():
    pm, theirs, ours, ctl = _peft_pair(tinit=1, tfinal=1, T=5, orth_reg_weight=0.3)
    eye = torch.eye(6)
    sq, unsq = [], []
    for a in ctl.layers.values():
        qa, pb = a.lora_A @ a.lora_A.T - eye, a.lora_B.T @ a.lora_B - eye
        sq.append((qa**2).sum() + (pb**2).sum())
        unsq += [qa.pow(2).sum().sqrt(), pb.pow(2).sum().sqrt()]
    torch.testing.assert_close(ctl.orth_loss(), 0.3 * sum(unsq) / len(unsq))
    squared = ctl.cfg.replace(method_options={"orth_form": "squared"})
    ctl.cfg = squared
    torch.testing.assert_close(ctl.orth_loss(), 0.3 * sum(sq) / len(sq))


def test_a_run_too_short_to_warm_up_still_masks_to_the_target_budget():
    """2 steps with the default fractions: tinit rounds to 0 and the final masking falls on step 1, before
    any importance update had run. The final masking scores the step's own gradients instead of failing."""
    m = _model()
    ctl = AdaLoraController(m, total_step=2)
    assert ctl.schedule.tinit == 0 and ctl.schedule.final_step == 1
    ids = _batch()
    m(input_ids=ids, labels=ids).loss.backward()
    assert ctl.step(1) == ctl.schedule.target_budget
    assert sum(a.r for a in ctl.layers.values()) == ctl.schedule.target_budget
