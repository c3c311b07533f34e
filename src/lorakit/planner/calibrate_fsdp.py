"""Check the planner's FSDP per-rank memory on a real 2-process CPU run: ``lorakit plan --calibrate
--distributed fsdp``.

The planner says each of K FSDP ranks holds 1/K of the weights (NF4 storage included), of the gradients
and of the optimizer states, plus the parameters gathered in flight (``lorakit.planner.cost``:
``Memory.sharded``, ``gather_bytes``). This runs the trainer itself -- ``torchrun --standalone
--nproc_per_node=K -m lorakit train`` with ``training.distributed: fsdp`` on the gloo backend, a builtin
model, LoRA on q/v, fp32, a few steps -- and reads what every rank held after its first optimizer step
(``summary.json`` ``fsdp_memory_per_rank``: parameter shards, gradients, AdamW state, all tensor bytes of
the process; ``lorakit.train.fsdp.rank_memory``). It compares them with the planner's figures for the same
model, method, rank and world size:

- weights: ``Memory.weights - Memory.gathered`` (the sharded part; at rest the gathered blocks are freed),
  against the rank's parameter bytes;
- gradients and optimizer states: ``Memory.gradients`` and ``Memory.optimizer_states``;
- the sum of the three against every tensor byte the process holds (buffers, the data batch and the
  allocator's bookkeeping tensors come on top; for information, not flagged).

A ratio predicted / measured outside ``1 +- tolerance`` on any of the three flagged terms, on any rank, is
a miss (``ok`` False, ``lorakit plan`` exits 1). The gathered term (``gathered``, in flight only during
forward and backward) is printed beside them but not measured. The planner may not import the trainer
(import-linter layers: they are siblings), so the run is a subprocess of the ``lorakit`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from lorakit.planner.arch import PlanError, resolve_arch
from lorakit.planner.cost import Setup, memory

TERMS = ("weights", "gradients", "optimizer_states")
_MEASURED = {"weights": "parameters", "gradients": "gradients", "optimizer_states": "optimizer"}


@dataclass
class FsdpCalibration:
    model: str
    world_size: int
    r: int
    tolerance: float
    predicted: dict[str, float]  # bytes per rank, by term (TERMS, "gathered", "sum")
    measured: list[dict[str, int]]  # per rank: parameters, gradients, optimizer, held
    command: list[str] = field(default_factory=list)

    def ratios(self) -> list[dict[str, float]]:
        """Per rank, predicted / measured for each flagged term and for the sum against all held bytes."""
        out = []
        for m in self.measured:
            row = {t: self.predicted[t] / max(m[_MEASURED[t]], 1) for t in TERMS}
            row["sum"] = self.predicted["sum"] / max(m["held"], 1)
            out.append(row)
        return out

    @property
    def misses(self) -> list[str]:
        """'rank R term: ratio' for every flagged term outside 1 +- tolerance."""
        return [
            f"rank {r} {t}: {row[t]:.3f}"
            for r, row in enumerate(self.ratios())
            for t in TERMS
            if abs(row[t] - 1.0) > self.tolerance
        ]

    @property
    def ok(self) -> bool:
        return not self.misses

    def table(self) -> str:
        mib = 2**20
        head = (f"FSDP calibration: {self.model}, LoRA r={self.r} on q/v, AdamW, fp32, {self.world_size} processes "
                f"(torchrun, gloo on CPU); per rank, after the first optimizer step; tolerance +-{self.tolerance:.0%}")
        lines = [head, f"{'':<30}{'predicted MiB':>14}" + "".join(
            f"{f'rank {r} MiB':>12}{'ratio':>8}" for r in range(self.world_size))]
        ratios = self.ratios()
        for t in TERMS:
            cells = "".join(f"{m[_MEASURED[t]] / mib:>12.3f}{ratios[r][t]:>8.3f}" for r, m in enumerate(self.measured))
            lines.append(f"{t + ' (sharded)':<30}{self.predicted[t] / mib:>14.3f}{cells}")
        cells = "".join(f"{m['held'] / mib:>12.3f}{ratios[r]['sum']:>8.3f}" for r, m in enumerate(self.measured))
        lines.append(f"{'sum vs all tensors held':<30}{self.predicted['sum'] / mib:>14.3f}{cells}")
        lines.append(f"{'gathered in flight (not measured)':<30}{self.predicted['gathered'] / mib:>14.3f}")
        lines.append("ok: the per-rank figures agree" if self.ok else "MISS: " + "; ".join(self.misses))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {**asdict(self), "ratios": self.ratios(), "ok": self.ok, "misses": self.misses}


def predicted_per_rank(model: str, r: int, world_size: int, method: str = "lora") -> dict[str, float]:
    """The planner's per-rank bytes for a run like the calibration's (``method`` r on q/v, fp32 adapters
    and compute, FSDP on ``world_size``; "qlora": the NF4 base with double quantization, lorakit's default)."""
    arch = resolve_arch(model)
    setup = Setup(method=method, r=r, targets=None, seq_len=16, micro_batch=2, precision="fp32",
                  grad_checkpointing=False, distributed="fsdp", adapter_dtype="fp32")
    mem = memory(arch, setup, gpus=world_size)
    out = {"weights": mem.weights - mem.gathered, "gradients": mem.gradients,
           "optimizer_states": mem.optimizer_states, "gathered": mem.gathered}
    out["sum"] = sum(out[t] for t in TERMS)
    return out


def fsdp_command(config: str, world_size: int) -> list[str]:
    """The torchrun command line the calibration runs (``python -m torch.distributed.run`` is torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            "-m", "lorakit", "train", config]


def _write_run(root: str, model: str, r: int, world_size: int, steps: int) -> str:
    data = os.path.join(root, "rows.jsonl")
    with open(data, "w") as f:
        for i in range(8 * world_size):
            f.write(json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n")
    cfg = {
        "model": {"name": model},
        "data": {"train": data},
        "adapter": {"r": r, "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 2, "grad_accumulation": 1, "lr": 1e-3, "warmup_steps": 0,
                     "num_workers": 0, "gradient_checkpointing": False, "eval_at_start": False,
                     "mixed_precision": "no", "distributed": "fsdp"},
        "output": {"dir": os.path.join(root, "run"), "progress": False, "plot": False, "save_every": 0},
    }
    path = os.path.join(root, "run.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def calibrate_fsdp(
    model: str = "llama-15m",
    r: int = 8,
    world_size: int = 2,
    steps: int = 1,
    tolerance: float = 0.1,
    timeout_s: float = 300.0,
) -> FsdpCalibration:
    """Run ``lorakit train`` under FSDP on ``world_size`` CPU processes and compare what each rank held
    with the planner's per-rank terms (see the module docstring). Raises ``PlanError`` (one line) when the
    run fails or does not finish within ``timeout_s``."""
    from lorakit.models.builtin import BUILTIN_SPECS

    if model not in BUILTIN_SPECS:
        raise PlanError(
            f"--calibrate --distributed fsdp: model {model!r} is not a builtin; expected one of {sorted(BUILTIN_SPECS)}"
        )
    if world_size < 2:
        raise PlanError(f"world_size={world_size!r}: FSDP calibration needs at least 2 processes")
    predicted = predicted_per_rank(model, r, world_size)
    with tempfile.TemporaryDirectory(prefix="lorakit-calib-fsdp-") as root:
        cmd = fsdp_command(_write_run(root, model, r, world_size, steps), world_size)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PlanError(f"FSDP calibration run did not finish within {timeout_s:g} s: {' '.join(cmd)}") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise PlanError(f"FSDP calibration run failed (exit {proc.returncode}): {last}")
        with open(os.path.join(root, "run", "summary.json")) as f:
            measured = json.load(f)["fsdp_memory_per_rank"]
    return FsdpCalibration(model, world_size, r, tolerance, predicted, measured, cmd)
