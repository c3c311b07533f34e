"""Model-FLOPs utilisation of a LoRA training step on CPU, against this machine's own matmul rate, same run.

    python -m benchmarks.bench_mfu                       # llama-15m, 8 x 256, LoRA q,v, 2 threads: all variants
    python -m benchmarks.bench_mfu --profile bf16_base   # + a torch.profiler breakdown of one variant

Formula (one optimizer step, B rows x T tokens, N = B*T; P_lin = weights of every nn.Linear incl. the LM head;
L layers, hidden d; each adapted layer of in x out with rank r):

    F_forward  = 2 * N * P_lin + 4 * B * T^2 * d * L          (linears; attention QK^T and AV over the full T x T)
    F_backward = 2 * N * P_lin + 8 * B * T^2 * d * L          (input gradients only: the base is frozen)
    F_adapter  = sum over adapted layers of 6 * N * r * (in + out)   (A, B forward + input grad + weight grad)
    MFU        = (F_forward + F_backward + F_adapter) / step_s / R

R is the plain matmul rate of this machine in the step's compute dtype, measured in the same process right
before the step (``torch.mm`` on the model's own linear shapes, N x in @ in x out, FLOP-weighted), so contention
on a shared machine hits both alike. Not counted as useful work: casts, norms, softmax, the loss, the optimizer —
that is what the profile breaks down.

Variants (all lorakit LoRA r 8 on q_proj / v_proj, AdamW, same seeded model and batch):
- ``fp32``: fp32 base, no autocast (R = the fp32 rate);
- ``bf16_autocast``: fp32 base under ``torch.autocast("cpu", bf16)`` (every frozen weight is cast at every matmul);
- ``bf16_base``: frozen base stored in bf16 under the same autocast, adapters fp32 (what ``model.dtype: auto``
  picks when the precision is bf16);
- ``bf16_base_compile``: ``bf16_base`` + what ``training.compile: true`` does (``maybe_compile``: each decoder
  block compiled in place, static shapes as for packed rows; compile time reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

VARIANTS = ("fp32", "bf16_autocast", "bf16_base", "bf16_base_compile")


def step_flops(model: torch.nn.Module, batch: int, seq: int) -> dict[str, float]:
    """The formula of the module docstring on this model (frozen linears, adapted layers found by their A/B)."""
    from lorakit.surgery.inject import adapted_layers

    n = batch * seq
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    p_lin = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad:
            p_lin += mod.weight.numel()
    adapter = 0.0
    for _, layer in adapted_layers(model):
        for name, p in layer.named_parameters():
            if p.requires_grad and p.ndim == 2 and "lora_A" in name:
                r, fan_in = p.shape
                out = layer.base.out_features
                adapter += 6 * n * r * (fan_in + out)
    attn = 4 * batch * seq * seq * d * layers
    fwd = 2 * n * p_lin + attn
    bwd = 2 * n * p_lin + 2 * attn
    return {"forward": fwd, "backward": bwd, "adapter": adapter, "total": fwd + bwd + adapter, "p_lin": p_lin}


def matmul_rate(model: torch.nn.Module, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of ``torch.mm`` on this model's distinct linear shapes (N x in @ in x out), FLOP-weighted."""
    shapes: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad:
            key = (mod.in_features, mod.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    flops = secs = 0.0
    g = torch.Generator().manual_seed(0)
    for (fin, fout), count in shapes.items():
        x = torch.randn(n, fin, generator=g).to(dtype)
        w = torch.randn(fin, fout, generator=g).to(dtype)
        torch.mm(x, w)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(x, w)
            ts.append(time.perf_counter() - t)
        flops += count * 2 * n * fin * fout
        secs += count * statistics.median(ts)
    return flops / secs


def build(variant: str, model_name: str, seed: int = 0) -> torch.nn.Module:
    import lorakit as lk

    dtype = torch.bfloat16 if variant.startswith("bf16_base") else None
    model = lk.build_model(model_name, seed=seed, dtype=dtype)
    lk.inject(model, lk.AdapterConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters stay fp32 masters (as the trainer does)
    return model.train()


def measure(variant: str, model_name: str, batch: int, seq: int, warmup: int, steps: int,
            profile: bool = False) -> dict[str, Any]:
    """Step times, FLOPs, the matmul rate and MFU of one variant (run it in its own process)."""
    from lorakit.models import builtin_config

    model = build(variant, model_name)
    flops = step_flops(model, batch, seq)
    compute = torch.float32 if variant == "fp32" else torch.bfloat16
    rate = matmul_rate(model, batch * seq, compute)
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, builtin_config(model_name).vocab_size, (batch, seq), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    fwd = model
    compile_s = 0.0
    if variant.endswith("compile"):
        from lorakit.train.build import maybe_compile

        if not maybe_compile(model, torch.device("cpu"), dynamic=False):
            raise SystemExit(f"{variant}: torch.compile is unavailable here")

    def step() -> float:
        if compute == torch.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = fwd(input_ids=ids, use_cache=False).logits
        else:
            logits = fwd(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t
        if i == 0 and variant.endswith("compile"):
            compile_s = dt
        if i >= warmup:
            times.append(dt)
    step_s = statistics.median(times)
    res = {"variant": variant, "step_s": step_s, "step_times": times, "loss_step1": losses[0],
           "gflop": flops["total"] / 1e9, "rate_gflops": rate / 1e9, "achieved_gflops": flops["total"] / step_s / 1e9,
           "mfu": flops["total"] / step_s / rate, "compile_s": compile_s,
           "rate_after_gflops": matmul_rate(model, batch * seq, compute) / 1e9}
    if profile:
        res["profile"] = breakdown(step)
    return res


_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "casts": ("aten::_to_copy", "aten::to", "aten::copy_", "aten::contiguous", "aten::clone"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::_fused_adam"),
    "loss": ("aten::cross_entropy", "aten::log_softmax", "aten::_log_softmax", "aten::nll_loss"),
}


def breakdown(step: Any) -> dict[str, Any]:
    """Self CPU time of two profiled steps by group (ops not listed fall in 'elementwise/norms/other')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    groups: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        group = next((g for g, pre in _GROUPS.items() if ev.key.startswith(pre)), "elementwise/norms/other")
        groups[group] = groups.get(group, 0.0) + us
        top.append((us, ev.key))
    total = sum(groups.values()) or 1.0
    top.sort(reverse=True)
    return {"share": {g: v / total for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "total_s_per_step": total / 2 / 1e6,
            "top": [{"op": k, "ms_per_step": us / 2 / 1e3} for us, k in top[:15]]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":  # worker VARIANT MODEL BATCH SEQ WARMUP STEPS PROFILE OUT
        v, m, b, s, w, n, prof, out = argv[1:]
        torch.set_num_threads(int(os.environ.get("LORAKIT_BENCH_THREADS", "2")))
        res = measure(v, m, int(b), int(s), int(w), int(n), prof == "1")
        with open(out, "w") as f:
            json.dump(res, f)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-15m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default="", help="variant(s) to profile, comma-separated")
    ap.add_argument("--out", default=None, help="write the JSON here")
    a = ap.parse_args(argv)
    import subprocess
    import tempfile

    variants = [v for v in a.variants.split(",") if v]
    prof = set(p for p in a.profile.split(",") if p)
    raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rnd in range(a.rounds):
        for v in variants if rnd % 2 == 0 else variants[::-1]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            p = "1" if v in prof and rnd == 0 else "0"
            cmd = [sys.executable, "-m", "benchmarks.bench_mfu", "worker", v, a.model, str(a.batch), str(a.seq),
                   str(a.warmup), str(a.steps), p, out]
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{v}: error {proc.stderr.strip().splitlines()[-1:]}")
                continue
            with open(out) as f:
                raw[v].append(json.load(f))
            os.unlink(out)
            r = raw[v][-1]
            print(f"round {rnd + 1} {v:<18} step {r['step_s']:.3f} s  {r['gflop']:.1f} GFLOP  rate "
                  f"{r['rate_gflops']:.0f} GFLOP/s  MFU {100 * r['mfu']:.1f}%  compile {r['compile_s']:.1f} s",
                  flush=True)
    summary = {}
    for v, rs in raw.items():
        if not rs:
            continue
        summary[v] = {"step_s": statistics.median(t for r in rs for t in r["step_times"]),
                      "mfu": statistics.median(r["mfu"] for r in rs),
                      "rate_gflops": statistics.median(r["rate_gflops"] for r in rs),
                      "gflop": rs[0]["gflop"], "loss_step1": rs[0]["loss_step1"],
                      "compile_s": max(r["compile_s"] for r in rs)}
        for r in rs:
            if "profile" in r:
                summary[v]["profile"] = r["profile"]
    print(json.dumps(summary, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            from benchmarks.run import _versions

            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(),
                       "versions": _versions(), "settings": vars(a), "variants": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
