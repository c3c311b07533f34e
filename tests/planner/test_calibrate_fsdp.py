"""``lorakit plan --calibrate --distributed fsdp``: the planner's per-rank FSDP memory against a real
2-process CPU run of the trainer (one torchrun launch, tiny-llama, one step), and a check that flags a
planner whose sharding term is wrong."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.planner import calibrate_fsdp as cf
from lorakit.planner import cost
from lorakit.planner.arch import PlanError, resolve_arch


@pytest.fixture(scope="module")
def calibration():
    return cf.calibrate_fsdp("tiny-llama", steps=1, timeout_s=240)


@pytest.mark.slow
def test_fsdp_calibration_agrees_with_the_planner(calibration):
    c = calibration
    assert len(c.measured) == 2 and c.ok, c.table()
    for rank in c.ratios():
        for term in cf.TERMS:
            assert rank[term] == pytest.approx(1.0, abs=0.1), (term, rank)
        assert rank["sum"] == pytest.approx(1.0, abs=0.1)  # nothing else of size held: no full copy left
    # the measured parameter bytes are half the unsharded model's (tiny-llama, fp32, with its LoRA)
    full = cost.memory(resolve_arch("tiny-llama"), dataclasses.replace(_setup(), distributed="ddp"))
    assert c.measured[0]["parameters"] == pytest.approx(full.weights / 2, rel=0.02)
    assert "ok: the per-rank figures agree" in c.table()


def _setup() -> cost.Setup:
    return cost.Setup(method="lora", r=8, seq_len=16, micro_batch=2, precision="fp32", grad_checkpointing=False,
                      distributed="fsdp")


@pytest.mark.slow
def test_a_wrong_sharding_term_is_flagged(calibration, monkeypatch):
    """The planner's weights left unsharded under FSDP (a broken ``Memory.sharded``): the same measured
    run no longer agrees, and the table says where."""
    real = cost.Memory.sharded

    def unsharded_weights(self, gpus, gather_bytes):
        return dataclasses.replace(real(self, gpus, gather_bytes), weights=self.weights + gather_bytes)

    monkeypatch.setattr(cost.Memory, "sharded", unsharded_weights)
    wrong = dataclasses.replace(calibration, predicted=cf.predicted_per_rank("tiny-llama", 8, 2))
    assert not wrong.ok
    assert wrong.misses == ["rank 0 weights: 2.000", "rank 1 weights: 2.000"]
    assert "MISS: rank 0 weights: 2.000" in wrong.table()


@pytest.mark.slow
def test_cli_exit_status_follows_the_check(calibration, monkeypatch, capsys):
    from lorakit.cli.main import main

    monkeypatch.setattr(cf, "calibrate_fsdp", lambda model: calibration)
    assert main(["plan", "--calibrate", "--distributed", "fsdp", "--model", "tiny-llama"]) == 0
    assert "FSDP calibration: tiny-llama" in capsys.readouterr().out
    missed = dataclasses.replace(calibration, predicted={**calibration.predicted, "gradients": 0.0})
    monkeypatch.setattr(cf, "calibrate_fsdp", lambda model: missed)
    assert main(["plan", "--calibrate", "--distributed", "fsdp", "--model", "tiny-llama"]) == 1


def test_refusals_and_command():
    with pytest.raises(PlanError, match="'7B' is not a builtin"):
        cf.calibrate_fsdp("7B")
    with pytest.raises(PlanError, match="at least 2 processes"):
        cf.calibrate_fsdp("tiny-llama", world_size=1)
    cmd = cf.fsdp_command("run.yaml", 2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit",
                       "train", "run.yaml"]
