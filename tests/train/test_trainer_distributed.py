"""``lorakit train`` under ``torchrun --nproc_per_node=2`` on CPU (gloo) equals one process with the same global
batch: the same loss trajectory (relative 1e-4) and the same adapter, identical on both ranks; an inf put
into one gradient on rank 1 only skips that step on both ranks, as in the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_products

from .test_trainer_nonfinite import InfGrad

SKIP_AT = 2  # the step whose gradient gets an inf (on rank 1 only under torchrun)

# ``lorakit train`` under torchrun, rank 1's trainer handed a callback that puts inf into one gradient
TORCHRUN_SCRIPT = textwrap.dedent(f"""
    import os, sys
    import lorakit.train.trainer as trainer
    from lorakit.cli.main import main
    from lorakit.train.callbacks import Callback

    class InfGrad(Callback):
        def on_train_begin(self, state):
            p = next(p for p in state.model.parameters() if p.requires_grad)
            p.register_hook(lambda g: g.index_fill(0, g.new_zeros(1, dtype=int), float("inf"))
                            if state.step + 1 == {SKIP_AT} else g)

    train = trainer.train
    def poisoned(*args, **kw):
        return train(*args, callbacks=[InfGrad()] if os.environ["RANK"] == "1" else [], **kw)
    trainer.train = poisoned
    sys.exit(main(["train", sys.argv[1]]))
""")


def _config(tmp_path, out: str, batch_size: int, accumulation: int) -> str:
    data = tmp_path / "d.jsonl"
    write_products(data)
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"train": "d.jsonl", "val_fraction": 0.2},
        "adapter": {"r": 4, "dropout": 0.0},  # dropout draws differ per rank; the comparison needs none
        "training": {"max_steps": 4, "batch_size": batch_size, "grad_accumulation": accumulation, "lr": 1e-2,
                     "warmup_steps": 1, "num_workers": 0, "gradient_checkpointing": False, "eval_every": 2,
                     "mixed_precision": "no"},  # exact parity: bf16 reductions differ with the batch split
        "output": {"dir": out, "progress": False, "plot": False, "save_every": 0},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = _config(tmp_path, "two", batch_size=2, accumulation=2)  # global batch 2 x 2 x 2 ranks = 8
    one = _config(tmp_path, "one", batch_size=4, accumulation=2)  # global batch 4 x 2 x 1 = 8
    script = tmp_path / "torchrun_train.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), two]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from lorakit.train.trainer import train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(one, callbacks=[InfGrad(at={SKIP_AT})])
    finally:
        torch.set_num_threads(n)
    r2, r1 = _records(str(tmp_path / "two")), _records(str(tmp_path / "one"))
    loss2 = [r["loss"] for r in r2 if "loss" in r]
    loss1 = [r["loss"] for r in r1 if "loss" in r]
    assert len(loss1) == len(loss2) == 4 and loss1[0] != loss1[-1]
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    ev2 = [r["eval_loss"] for r in r2 if "eval_loss" in r]
    ev1 = [r["eval_loss"] for r in r1 if "eval_loss" in r]
    assert ev2 == pytest.approx(ev1, rel=1e-4)  # sharded evaluation sums to the same mean
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["skipped_steps"] == 1 and f"step {SKIP_AT}: gradient norm is not finite" in proc.stderr
    assert json.load(open(tmp_path / "one" / "summary.json"))["skipped_steps"] == 1
    assert summary["rank_max_abs_diff"] == 0.0  # both ranks hold bit-identical adapters
    a2 = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    a1 = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
