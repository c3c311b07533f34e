"""AdaLoRA's budget schedule, importance scores and masking, against the paper's equations and PEFT."""

import pytest
import torch

import lorakit as lk
from adapters.adalora_helpers import TARGETS
from adapters.adalora_helpers import adalora_model as _model
from adapters.adalora_helpers import token_batch as _batch
from lorakit.adapters.adalora import AdaLoraCallback, AdaLoraController, adalora_orth_loss, adalora_step
from lorakit.adapters.adalora_budget import BudgetSchedule, RankAllocator
from lorakit.adapters.base import method_callbacks
from lorakit.bench.adalora_report import rank_report
from lorakit.config import ConfigError
from lorakit.train.callbacks import TrainState


def _cubic(t, b0, bT, tinit, tfinal, T):
    """Eq. 12 of Zhang et al. 2023, written out (integer budget, floored as PEFT does)."""
    if t <= tinit:
        return b0
    if t > T - tfinal:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - tinit) / (T - tinit - tfinal)) ** 3)


def test_budget_equals_formula_at_chosen_steps():
    s = BudgetSchedule(init_budget=48, target_budget=32, tinit=10, tfinal=20, total_step=100, delta_t=5)
    for t in (0, 1, 10, 11, 25, 50, 79, 80, 81, 100):
        assert s.budget(t) == _cubic(t, 48, 32, 10, 20, 100), t
    assert (
        s.budget(10) == 48 and s.budget(80) == 32 and s.budget(45) == int(32 + 16 * (1 - 35 / 70) ** 3) == 34
    )
    masking = [t for t in range(0, 101) if s.is_masking_step(t)]
    assert masking == [
        15,
        20,
        25,
        30,
        35,
        40,
        45,
        50,
        55,
        60,
        65,
        70,
        75,
        80,
    ]  # every delta_t, and T - tfinal


def test_unmasked_count_equals_budget_and_masked_stay_zero():
    T = 10
    m = _model(total_step=T, tinit=1, tfinal=2, delta_t=3)
    ctl = AdaLoraController(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    ids, revived, checked = _batch(), 0, 0
    for t in range(1, T + 1):
        loss = m(input_ids=ids, labels=ids).loss + ctl.orth_loss()
        loss.backward()
        opt.step()
        before = {n: a.lora_E.detach().clone() for n, a in ctl.layers.items()}
        masks = {n: a.rank_mask.clone() for n, a in ctl.layers.items()}
        budget = ctl.step(t)
        kept = sum(ctl.ranks().values())
        if ctl.schedule.is_masking_step(t):
            assert kept == budget == _cubic(t, 24, 12, 1, 2, T), t
            assert sum(int((a.lora_E != 0).sum()) for a in ctl.layers.values()) == budget
        else:
            for n, a in ctl.layers.items():  # the optimizer moved pruned values; the step puts them back to 0
                revived += int((before[n][~masks[n]] != 0).sum())
                assert torch.equal(a.rank_mask, masks[n])
                assert (a.lora_E[~a.rank_mask] == 0).all()
                checked += int((~a.rank_mask).sum())
        opt.zero_grad()
    assert checked > 0 and revived > 0  # the test sees real revivals being undone
    assert sum(ctl.ranks().values()) == 12 and ctl.allocator.ipt_avg == {}  # final budget; EMAs dropped


def test_importance_ema_and_triplet_score_by_hand():
    g = torch.Generator().manual_seed(3)
    a, e, b = (torch.randn(s, generator=g).requires_grad_() for s in ((3, 5), (3, 1), (4, 3)))
    alloc = RankAllocator({"m": (a, e, b)}, beta1=0.7, beta2=0.6)
    ibar = [torch.zeros_like(t) for t in (a, e, b)]
    ubar = [torch.zeros_like(t) for t in (a, e, b)]
    for _ in range(3):
        for t in (a, e, b):
            t.grad = torch.randn(t.shape, generator=g)
        alloc.update_importance()
        for i, t in enumerate((a, e, b)):
            sens = (t.detach() * t.grad).abs()
            ibar[i] = 0.7 * ibar[i] + 0.3 * sens
            ubar[i] = 0.6 * ubar[i] + 0.4 * (sens - ibar[i]).abs()
    s = [i * u for i, u in zip(ibar, ubar)]
    want = s[1].view(-1) + s[0].mean(1) + s[2].mean(0)
    torch.testing.assert_close(alloc.triplet_scores()["m"], want)
    keep = alloc.masks_for_budget(2)["m"]
    assert keep.tolist() == [i in want.topk(2).indices.tolist() for i in range(3)]


def test_masks_match_peft_rank_allocator():
    """Same weights and gradients: our allocator keeps the same singular values as PEFT's RankAllocator."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = lk.build_model("tiny-llama", seed=0)
    pcfg = peft.AdaLoraConfig(init_r=6, target_r=3, total_step=10, target_modules=TARGETS, lora_alpha=8)
    pm = peft.get_peft_model(base, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = _model()
    theirs = {n: p for n, p in pm.base_model.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for path, a in AdaLoraController(ours).layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(a, key).copy_(theirs[f"{path}.{key}.default"])
    ctl = AdaLoraController(ours, total_step=10)
    for model, update in (
        (pm, lambda: pm.base_model.rankallocator.update_ipt(pm.base_model.model)),
        (ours, ctl.allocator.update_importance),
    ):
        for ids in (_batch(1), _batch(2)):  # two EMA steps with different data (no orth term in the loss)
            logits = model(input_ids=ids).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
            update()
            model.zero_grad()
    peft_pattern = pm.base_model.rankallocator.mask_to_budget(pm.base_model.model, 15)
    ours_masks = ctl.allocator.masks_for_budget(15)
    for path, keep in ours_masks.items():
        assert keep.tolist() == peft_pattern[f"{path}.lora_E.default"], path
    assert sum(int(k.sum()) for k in ours_masks.values()) == 15


def test_orth_penalty_decreases_in_short_run_with_callback():
    m = _model(total_step=8, tinit=1, tfinal=1, orth_reg_weight=0.5)
    (cb,) = method_callbacks(m)
    assert isinstance(cb, AdaLoraCallback)
    a = cb.controller.layers["model.layers.0.self_attn.q_proj"]
    eye = torch.eye(6)
    by_hand = ((a.lora_A @ a.lora_A.T - eye) ** 2).sum() + ((a.lora_B.T @ a.lora_B - eye) ** 2).sum()
    torch.testing.assert_close(a.orth_penalty(), by_hand)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    state = TrainState(model=m, total_steps=8, optimizer=opt)
    cb.on_train_begin(state)
    penalties, ids = [], _batch()
    for _ in range(8):
        reg = cb.extra_loss(state)
        penalties.append(float(reg.detach()))
        (m(input_ids=ids, labels=ids).loss + reg).backward()
        opt.step()
        state.step += 1
        cb.on_step_end(state)
        opt.zero_grad(set_to_none=True)
    assert penalties[-1] < 0.5 * penalties[0], penalties
    assert state.metrics["adalora_budget"] == 12


def test_total_step_from_trainer_state_and_recorded_in_config():
    m = _model()
    (cb,) = method_callbacks(m)
    with pytest.raises(ConfigError, match="total_step is not set"):
        cb.on_train_begin(TrainState(model=m, total_steps=0))
    cb.on_train_begin(TrainState(model=m, total_steps=40))
    assert cb.controller.schedule.total_step == 40 and lk.adapter_configs(m)["default"].total_step == 40
    m2 = _model(tinit=5, tfinal=5)
    (cb2,) = method_callbacks(m2)
    with pytest.raises(ConfigError, match=r"total_step=10 is too small.*tinit \+ tfinal"):
        cb2.on_train_begin(TrainState(model=m2, total_steps=10))
    with pytest.raises(ConfigError, match="total_step is not set"):
        AdaLoraController(_model()).step(1)


def test_checkpoint_state_round_trip_continues_identically():
    T = 10
    runs = []
    for resume in (False, True):
        m = _model(total_step=T, tinit=1, tfinal=2, seed=4)
        ctl = AdaLoraController(m)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        ids = _batch(2)
        for t in range(1, T + 1):
            (m(input_ids=ids, labels=ids).loss + ctl.orth_loss()).backward()
            opt.step()
            ctl.step(t)
            opt.zero_grad()
            if resume and t == 4:  # a fresh controller restored from the state continues the same way
                state = ctl.state_dict()
                ctl = AdaLoraController(m)
                ctl.load_state_dict(state)
        runs.append({n: a.rank_mask.tolist() for n, a in ctl.layers.items()})
    assert runs[0] == runs[1]


def test_adalora_step_one_call_for_own_loop():
    m = _model(total_step=6, tinit=1, tfinal=1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = _batch()
    for t in range(1, 7):
        (m(input_ids=ids, labels=ids).loss + adalora_orth_loss(m)).backward()
        opt.step()
        budget = adalora_step(m, t)
        opt.zero_grad()
    assert budget == 12 and rank_report(m).total == 12


def test_bad_inputs():
    with pytest.raises(ConfigError, match="target_r=9 is larger than init_r=6"):
        lk.AdapterConfig(method="adalora", init_r=6, target_r=9)
    with pytest.raises(ConfigError, match="total_step=10 is too small"):
        lk.AdapterConfig(method="adalora", total_step=10, tinit=5, tfinal=5)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="beta1"):
            lk.AdapterConfig(method="adalora", beta1=beta)
    with pytest.raises(ConfigError, match="beta2"):
        RankAllocator({"m": (torch.zeros(1, 1),) * 3}, beta2=-0.1)
    with pytest.raises(ConfigError, match="use_rslora"):
        lk.AdapterConfig(method="adalora", use_rslora=True)
    with pytest.raises(ConfigError, match="pissa"):
        lk.AdapterConfig(method="adalora", init="pissa")
    with pytest.raises(ConfigError, match="rank_pattern cannot be combined with method='adalora'"):
        _model(rank_pattern={"q_proj": 4})
    with pytest.raises(ValueError, match="linear layers only; 'model.embed_tokens'"):
        _model(target_modules=["embed_tokens"])
    with pytest.raises(ConfigError, match="expected 'adalora'"):
        AdaLoraController(lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(target_modules=TARGETS)))
    m = _model(total_step=5)
    with pytest.raises(RuntimeError, match="no gradients.*before optimizer.zero_grad"):
        AdaLoraController(m).step(1)
    with pytest.raises(ConfigError, match="total_step=0 is invalid"):
        AdaLoraController(m, total_step=0)
