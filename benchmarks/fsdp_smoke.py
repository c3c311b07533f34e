"""One-GPU FSDP smoke run for ``--suite gpu``: ``lorakit train`` with ``training.distributed: fsdp``, bf16, NF4.

    python -m benchmarks.fsdp_smoke            # alone; also run by `python -m benchmarks.run --suite gpu`

The lent GPU machine has one GPU. FSDP needs several processes and two NCCL ranks cannot share one device
(NCCL refuses a duplicate GPU), so the smoke run is one process under torchrun
(``--standalone --nproc_per_node=1``) with ``LORAKIT_FSDP_ONE_PROCESS=1``, the only case the trainer's
"fsdp on one process" refusal lets through (``lorakit.train.distributed.one_process_fsdp``): every decoder
block and the root are wrapped by ``fully_shard`` on a one-device mesh, so the code path of a sharded run
-- NF4 codes and scales as FSDP parameters, the bf16 ``MixedPrecisionPolicy`` on CUDA, the gathered
adapter and optimizer state in the checkpoint -- runs on the GPU, while nothing is actually split (the
2-process sharding itself is tested on CPU, tests/train/test_fsdp.py). Checked: exit 0, bf16 precision on
CUDA, every logged loss finite, the adapter saved whole (each LoRA tensor of rank ``R``), the per-rank
memory recorded. Without CUDA it is skipped with a one-line reason.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

CASE = "fsdp_smoke"
R = 8


def smoke_config(root: str, model: str, steps: int = 4, device: str = "cuda") -> str:
    """The smoke run's config (``device`` "cpu" only for tests: fp32 there, the same launch)."""
    data = os.path.join(root, "rows.jsonl")
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(32):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    cuda = device == "cuda"
    cfg = {
        "model": {"name": model},
        "data": {"train": data, "val_fraction": 0.25},
        "adapter": {"r": R, "dropout": 0.0},
        "quant": {"dtype": "nf4", "compute_dtype": "bfloat16" if cuda else "float32"},
        "training": {"max_steps": steps, "batch_size": 4, "grad_accumulation": 1, "lr": 1e-3, "warmup_steps": 0,
                     "num_workers": 0, "gradient_checkpointing": True, "eval_every": steps,
                     "mixed_precision": "bf16" if cuda else "no", "device": device, "distributed": "fsdp"},
        "output": {"dir": os.path.join(root, "run"), "progress": False, "plot": False, "save_every": steps},
    }
    path = os.path.join(root, "smoke.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def smoke_command(config: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the smoke launch: torchrun with one process, FSDP allowed on it."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "lorakit", "train", config]
    return argv, {"LORAKIT_FSDP_ONE_PROCESS": "1", "OMP_NUM_THREADS": "1"}


def check_run(out: str, expect_device: str = "cuda") -> dict[str, Any]:
    """The smoke checks on a finished run directory; raises AssertionError naming the first that fails."""
    from safetensors.torch import load_file

    summary = json.load(open(os.path.join(out, "summary.json")))
    losses = [json.loads(line).get("loss") for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [x for x in losses if x is not None]
    assert summary["world_size"] == 1 and summary["device"].startswith(expect_device), summary["device"]
    if expect_device == "cuda":
        assert summary["precision"] == "bf16", summary["precision"]
    assert losses and all(math.isfinite(x) for x in losses), losses
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    ranks = {t.shape[0] for k, t in adapter.items() if "lora_A" in k} | {
        t.shape[1] for k, t in adapter.items() if "lora_B" in k}
    assert adapter and ranks == {R}, ranks  # whole tensors, never a shard
    memory = summary["fsdp_memory_per_rank"]
    assert len(memory) == 1 and memory[0]["parameters"] > 0, memory
    return {"steps": summary["steps"], "losses": losses, "precision": summary["precision"],
            "device": summary["device"], "adapter_tensors": len(adapter), "memory_per_rank": memory[0],
            "cuda_max_allocated_mib": summary.get("cuda_max_allocated_mib")}


def run_smoke(model: str = "llama-15m", steps: int = 4, timeout: float = 600.0) -> dict[str, Any]:
    """The smoke run's row for the benchmark report: ``ok`` and what was checked, ``error``, or ``skipped``
    with the reason (no CUDA device)."""
    import torch

    row: dict[str, Any] = {"case": CASE, "side": "lorakit"}
    if not torch.cuda.is_available():
        return {**row, "skipped": "no CUDA device: the one-GPU FSDP smoke run (bf16, NF4) needs one"}
    with tempfile.TemporaryDirectory(prefix="lorakit-fsdp-smoke-") as root:
        argv, extra = smoke_command(smoke_config(root, model, steps))
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **extra})
        row["wall_s"] = time.perf_counter() - t
        if proc.returncode != 0:
            return {**row, "error": "\n".join(proc.stderr.strip().splitlines()[-5:])}
        try:
            row.update(check_run(os.path.join(root, "run")), ok=True)
        except AssertionError as e:
            row.update(error=f"smoke check failed: {e}", ok=False)
    return row


def markdown_line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"FSDP one-GPU smoke (bf16, NF4): not run: {row['skipped']}"
    if "error" in row:
        return f"FSDP one-GPU smoke (bf16, NF4): FAILED: {row['error'].splitlines()[-1][:200]}"
    return (f"FSDP one-GPU smoke (bf16, NF4, torchrun 1 process): ok, {row['steps']} steps, losses "
            f"{', '.join(f'{x:.4f}' for x in row['losses'])}, {row['wall_s']:.1f} s, rank memory "
            f"{row['memory_per_rank']}")


if __name__ == "__main__":
    res = run_smoke()
    print(markdown_line(res))
    sys.exit(1 if "error" in res else 0)
