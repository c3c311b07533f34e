"""`--overwrite` never loses the previous run before the new one has a checkpoint; `--resume` of a finished
run says so (issue 20 items 1 and 6)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from lorakit.train.config import RunConfig
from lorakit.train.data import DataError
from lorakit.train.trainer import train
from train.test_trainer import Crash, run_config, with_output

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def snapshot(out) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``out``."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, out)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture
def old_run(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=4), save_every=2)
    train(cfg)
    before = snapshot(cfg.output.dir)
    assert "adapter/adapter_model.safetensors" in before and any(k.startswith("checkpoints/") for k in before)
    return cfg, before


def no_litter(cfg) -> bool:
    parent, name = os.path.split(cfg.output.dir)
    return not [e for e in os.listdir(parent) if ".staging" in e] and not [
        e for e in os.listdir(cfg.output.dir) if e.startswith(".replaced-")
    ]


def test_a_new_run_that_fails_to_start_leaves_the_old_run_intact(old_run, tmp_path):
    cfg, before = old_run
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(tmp_path / "nope.json")))
    with pytest.raises(DataError):
        train(bad, overwrite=True)
    assert snapshot(cfg.output.dir) == before and no_litter(cfg)


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_the_old_run_intact(old_run):
    cfg, before = old_run
    with pytest.raises(KeyboardInterrupt):
        train(with_output(cfg, save_every=3), overwrite=True, callbacks=[Crash(at=2)])
    assert snapshot(cfg.output.dir) == before and no_litter(cfg)


KILL = textwrap.dedent("""
    import os, signal, sys
    from lorakit.train.callbacks import Callback
    from lorakit.train.trainer import train

    class Kill(Callback):
        def on_after_backward(self, state):
            os.kill(os.getpid(), signal.SIGKILL)

    train(sys.argv[1], overwrite=True, callbacks=[Kill()])
""")


def test_sigkill_of_the_new_run_leaves_the_old_run_and_the_next_overwrite_replaces_it(old_run, tmp_path):
    cfg, before = old_run
    path, script = tmp_path / "run.yaml", tmp_path / "kill.py"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    script.write_text(KILL)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(cfg.output.dir) == before
    new = with_output(RunConfig.from_dict({**cfg.to_dict()}), save_every=2)
    new = dataclasses.replace(new, training=dataclasses.replace(new.training, lr=3e-2, max_steps=2))
    res = train(new, overwrite=True)
    after = snapshot(cfg.output.dir)
    assert res.steps == 2 and no_litter(cfg)
    assert after["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert not any(k.startswith("checkpoints/step-00000004") for k in after)  # the old run's files are gone


def test_resume_of_a_finished_run_says_it_is_complete(old_run, capsys):
    cfg, before = old_run
    capsys.readouterr()
    res = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert "already complete (4 of 4 steps)" in out and "wall_time_s" not in out
    assert res.steps == 4 and res.summary["wall_time_s"] > 0 and snapshot(cfg.output.dir) == before


def test_resume_after_an_interrupt_says_where_it_resumes(tmp_path, capsys):
    cfg = with_output(run_config(tmp_path, max_steps=4), save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Crash(at=3)])
    capsys.readouterr()
    train(cfg, resume=True)
    assert "resuming from step 2 of 4" in capsys.readouterr().out
