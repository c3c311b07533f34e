"""Ctrl-C or SIGTERM (a launcher or scheduler ending the job) stop a run with one line naming the last
checkpoint; the CLI exits 130 / 143; --resume continues from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lorakit.train import stopping
from lorakit.train.callbacks import Callback
from lorakit.train.trainer import train
from train.test_trainer import Crash, adapter_tensors, run_config, with_output

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Sigterm(Callback):
    """SIGTERM to this process in the middle of step ``at``, as torchrun's agent or SLURM would send it."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, state) -> None:
        if state.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once; a default SIGTERM would have ended the process


def test_sigterm_stops_the_run_naming_its_last_checkpoint_and_resume_is_exact(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=6), save_every=2)
    with pytest.raises(stopping.TrainingStopped) as err:
        train(cfg, callbacks=[Sigterm(at=4)])
    msg = str(err.value)
    assert err.value.exit_code == 143
    assert msg.startswith("stopped by SIGTERM; last checkpoint: "), msg
    assert msg.endswith("continue with --resume"), msg
    assert "step-00000002" in msg and "\n" not in msg
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    res = train(cfg, resume=True)
    assert res.steps == 6
    ref = with_output(cfg, dir=str(tmp_path / "ref"))
    train(ref)
    mine, theirs = adapter_tensors(cfg.output.dir), adapter_tensors(ref.output.dir)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path):
    cfg = run_config(tmp_path, max_steps=4)
    with pytest.raises(stopping.TrainingStopped) as err:
        train(cfg, callbacks=[Crash(at=2)])  # raises KeyboardInterrupt, as Ctrl-C does
    assert str(err.value) == "interrupted; no checkpoint was written yet" and err.value.exit_code == 130


def test_a_host_programs_own_sigterm_handler_is_kept(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with stopping.sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_rank_messages_name_the_rank_and_the_launcher():
    msg = str(stopping.stopped(stopping.Terminated(), 1, "/x/checkpoints/step-00000004"))
    assert msg.startswith("rank 1: stopped by SIGTERM (torchrun stops every rank when one fails")
    assert msg.endswith("last checkpoint: /x/checkpoints/step-00000004; continue with --resume")


def test_the_cli_exits_143_on_sigterm_with_the_checkpoint_line(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=100_000), save_every=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    ckpts = os.path.join(cfg.output.dir, "checkpoints")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isdir(ckpts) and any(e.startswith("step-") for e in os.listdir(ckpts)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorakit train: stopped by SIGTERM; last checkpoint: "), err
    assert last.endswith("; continue with --resume")
