"""Per-rank memory under FSDP2 (``training.distributed: fsdp``, 2 processes) beside one process, same run.

    python benchmarks/bench_fsdp.py                  # llama-15m, LoRA and QLoRA (NF4), ~2-4 min on 2 cores
    python benchmarks/bench_fsdp.py --cases adalora  # AdaLoRA (its adapter replicated, the base sharded)
    python benchmarks/bench_fsdp.py --model tiny-llama --rounds 1   # quick

Setup: builtin llama-15m (hidden 512, 4 layers, vocab 2000, ~14.6M parameters), LoRA r=8 on q_proj/v_proj,
dropout 0, ``lorakit train`` for ``--steps`` optimizer steps (batch 2 per process x accumulation 1, short
synthetic rows), fp32, gloo, OMP_NUM_THREADS=1. Each configuration runs in its own processes (one process:
``python``; FSDP: ``torchrun --standalone --nproc_per_node=2``), interleaved over ``--rounds``.

Figures, taken by a callback at the end of training (after the last step, the sharded model at rest):
- held MiB: ``lorakit.bench.memory.held_tensor_bytes`` -- every tensor storage the process holds, each once
  at its current size (shards, a leftover full copy, optimizer state, buffers), so a full copy kept
  anywhere shows; medians over rounds.
- RSS MiB: resident set of the process then (includes torch, Python and the libraries: a floor of a few
  hundred MiB that does not shard).
- ratio: FSDP rank's held / one process's held (the goal: <= 0.55 with 2 ranks).
The model's own unsharded bytes (parameters + buffers) are printed for reference. Figures depend on the
machine's load only through time, not memory; this harness does not time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap

import yaml

PROBE = textwrap.dedent("""
    import gc, json, os, sys
    import torch.distributed as dist, yaml
    import lorakit.train.trainer as trainer
    from lorakit.bench.memory import current_rss_mib, held_tensor_bytes
    from lorakit.train.callbacks import Callback

    class Probe(Callback):
        def __init__(self, out):
            self.out = out
        def on_train_end(self, state):
            gc.collect()
            rank = int(os.environ.get("RANK", "0"))
            with open(os.path.join(self.out, f"held-{rank}.json"), "w") as f:
                json.dump({"held": held_tensor_bytes(), "rss_mib": current_rss_mib()}, f)

    cfg = sys.argv[1]
    trainer.train(cfg, callbacks=[Probe(yaml.safe_load(open(cfg))["output"]["dir"])])
""")

# case: (quant, adapter fields beyond r=8 on q/v); AdaLoRA's adapter stays whole on every rank under FSDP
CASES = {"lora": (None, {}), "qlora": ({"dtype": "nf4", "compute_dtype": "float32"}, {}),
         "adalora": (None, {"method": "adalora", "init_r": 8, "target_r": 4, "tinit": 1, "tfinal": 0, "delta_t": 1})}


def _config(root: str, name: str, model: str, steps: int, fsdp: bool, quant, adapter: dict) -> str:
    data = os.path.join(root, "d.jsonl")
    if not os.path.exists(data):
        rng = random.Random(0)
        with open(data, "w") as f:
            for _ in range(64):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    out = os.path.join(root, name)
    cfg = {
        "model": {"name": model},
        "data": {"train": data},
        "adapter": {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **adapter},
        "training": {"max_steps": steps, "batch_size": 2 if fsdp else 4, "grad_accumulation": 1, "lr": 1e-3,
                     "warmup_steps": 0, "num_workers": 0, "gradient_checkpointing": False, "eval_at_start": False,
                     "mixed_precision": "no", **({"distributed": "fsdp"} if fsdp else {})},
        "output": {"dir": out, "progress": False, "plot": False, "save_every": 0},
    }
    if quant:
        cfg["quant"] = quant
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _run(script: str, cfg: str, fsdp: bool) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if fsdp else [
        sys.executable]
    proc = subprocess.run([*launch, script, cfg], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{cfg}: failed\n{proc.stderr[-2000:]}")
    out = yaml.safe_load(open(cfg))["output"]["dir"]
    ranks = 2 if fsdp else 1
    return [json.load(open(os.path.join(out, f"held-{r}.json"))) for r in range(ranks)]


def _model_mib(model: str, quant) -> float:
    import torch

    from lorakit import QuantConfig, build_model, quantize

    m = build_model(model, seed=0)
    if quant:
        quantize(m, QuantConfig(dtype="nf4", compute_dtype=torch.float32))
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-15m")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="lora,qlora")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    res: dict[tuple[str, str], list[list[dict]]] = {}
    with tempfile.TemporaryDirectory() as root:
        script = os.path.join(root, "probe.py")
        with open(script, "w") as f:
            f.write(PROBE)
        for rnd in range(args.rounds):
            order = [(c, s) for c in cases for s in ("one", "fsdp")]
            for case, side in order if rnd % 2 == 0 else order[::-1]:
                cfg = _config(root, f"{case}-{side}-{rnd}", args.model, args.steps, side == "fsdp", *CASES[case])
                res.setdefault((case, side), []).append(_run(script, cfg, side == "fsdp"))
                print(f"round {rnd + 1} {case} {side} done", file=sys.stderr, flush=True)
    print(f"{args.model}, {args.steps} steps, gloo on CPU; held = all tensor bytes of the process, median of "
          f"{args.rounds} rounds\n")
    print("| case | model MiB (unsharded) | 1 process held MiB | FSDP rank 0 held | FSDP rank 1 held | ratio "
          "(max rank / 1 process) | 1 process RSS MiB | FSDP rank 0 RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        one = statistics.median(r[0]["held"] for r in res[(case, "one")]) / 2**20
        ranks = [statistics.median(r[k]["held"] for r in res[(case, "fsdp")]) / 2**20 for k in (0, 1)]
        rss1 = statistics.median(r[0]["rss_mib"] for r in res[(case, "one")])
        rss2 = statistics.median(r[0]["rss_mib"] for r in res[(case, "fsdp")])
        print(f"| {case} | {_model_mib(args.model, CASES[case][0]):.2f} | {one:.2f} | {ranks[0]:.2f} | {ranks[1]:.2f} "
              f"| {max(ranks) / one:.3f} | {rss1:.0f} | {rss2:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
