"""A run's resumable parts (lorakit.train.progress.Resumable) through a checkpoint and back, and the step
log's cadence (lorakit.train.steplog.StepLog), each on its own, without the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train.callbacks import Callback, TrainState
from lorakit.train.progress import Progress, Resumable
from lorakit.train.steplog import StepLog


class Counter(Callback):
    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state) -> None:
        self.n = state["n"]


def parts(seed: int = 0, global_batch: int = 4, callbacks=None) -> tuple[torch.nn.Module, Resumable]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cbs = [Counter()] if callbacks is None else callbacks
    return model, Resumable(TrainState(model=model), Progress(), opt, sched, None, cbs, global_batch, seed)


def test_resumable_round_trip_through_a_checkpoint(tmp_path):
    model, res = parts()
    model(torch.ones(1, 3)).sum().backward()
    res.optimizer.step()
    res.scheduler.step()
    res.state.step, res.progress.epoch, res.progress.tokens, res.callbacks[0].n = 7, 1, 99, 5
    path = ckpt.save_checkpoint(str(tmp_path), 7, model, res.state_dict())
    fresh_model, fresh = parts()
    fresh.restore(path, fresh_model)
    assert fresh.state.step == 7 and fresh.progress.tokens == 99 and fresh.progress.saved_step == 7
    assert fresh.callbacks[0].n == 5 and fresh.scheduler.last_epoch == res.scheduler.last_epoch
    moment = fresh.optimizer.state[fresh_model.weight]["exp_avg"]
    assert torch.equal(moment, res.optimizer.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("change, fragment", [
    (dict(seed=1), "written with seed=0, now 1"),
    (dict(global_batch=8), "written with global_batch=4, now 8"),
    (dict(callbacks=[]), "no callback to restore the state of"),
])
def test_resumable_refuses_a_checkpoint_of_another_run(tmp_path, change, fragment):
    model, res = parts()
    res.callbacks[0].n = 1
    path = ckpt.save_checkpoint(str(tmp_path), 1, model, res.state_dict())
    other_model, other = parts(**change)
    with pytest.raises(ckpt.CheckpointError, match=fragment):
        other.restore(path, other_model)


def test_step_log_writes_every_log_every_and_the_last_step_on_rank_0_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = StepLog(str(path), None, log_every=2, total=5)
    for step in range(1, 6):
        log.step(step, 0, 1.0 / step, 1e-3, None, 10 * step, 10, 0.5, {"extra": step})
    log.evaluation(5, {"eval_loss": 0.5})
    log.evaluation(5, None)  # no validation set: nothing
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 5] and rows[0]["tokens_per_s"] == 20.0
    assert rows[0]["extra"] == 2 and rows[-1] == {"step": 5, "eval_loss": 0.5} and log.records == rows
    other = StepLog(None, None, log_every=1, total=5)  # another rank: no file, no records
    other.step(1, 0, 1.0, 1e-3, 1.0, 10, 10, 0.5, {})
    assert other.records == []
