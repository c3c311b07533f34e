"""DoRA vs LoRA, lorakit vs PEFT: training-step time and peak memory in one run on one machine.

    python benchmarks/bench_dora.py                      # ~2-4 min on 2 CPU cores
    python benchmarks/bench_dora.py --steps 3 --no-rss   # quicker
    python benchmarks/bench_dora.py --decode-only        # decode section alone, ~1 min

Setup (issue 5): builtin llama-15m (hidden 512, 4 layers, vocab 2000), adapters r=8 alpha=16 on q_proj and
v_proj, dropout 0, batch 8 x 256 tokens, causal-LM loss, AdamW (lr 1e-4), torch.set_num_threads(2).

Figures and their formulas:
- step time: median over ``--steps`` timed steps (after ``--warmup``) of one full training step
  (zero_grad + forward + backward + optimizer step), wall clock, ``time.perf_counter``. The four
  configurations run interleaved (lk-LoRA, lk-DoRA, PEFT-LoRA, PEFT-DoRA, then again), so a slow
  spell of a shared machine hits all of them alike.
- layer time: the same comparison on one adapted q_proj alone (forward + backward of a (2048, 512)
  input that requires grad), median of many repeats: the adapter's own cost without the model around it.
- saved for backward: bytes of the distinct tensor storages autograd keeps for backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``), a torch-aware measure of training memory.
- OpenMP: OMP_WAIT_POLICY=PASSIVE unless set (see below): figures measure work, not spin-waiting.
- peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh subprocess per configuration that
  imports the same libraries, builds the model and runs two training steps (``--no-rss`` skips it).
- decode (issue 14): one adapted 2048x2048 linear (no bias, like Llama's projections), fp32 and bf16
  base, adapter r=8 alpha=16 in fp32, eval, ``torch.inference_mode`` (as the server runs), input
  32 rows x 1 token. Median forward time over ``--decode-repeats`` interleaved repeats of lk-LoRA,
  lk-DoRA, lk-DoRA with its norm cache cleared before every call (the cost before the cache), PEFT
  LoRA and PEFT DoRA; ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

# Idle OpenMP threads sleep instead of spinning (set before torch loads OpenMP). On a shared, loaded
# machine spinning threads steal the cores the working threads wait for, and every parallel kernel
# then costs a scheduling round: wall times became 3-5x longer and noisy. Override by exporting
# OMP_WAIT_POLICY=ACTIVE before running.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from lorakit.bench.memory import peak_rss_mib  # noqa: E402

warnings.filterwarnings("ignore")
CONFIGS = ("lk-lora", "lk-dora", "peft-lora", "peft-dora")
MODEL, R, ALPHA, TARGETS, BATCH, SEQ, THREADS = "llama-15m", 8, 16, ["q_proj", "v_proj"], 8, 256, 2


def build(config: str, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """The llama-15m model with the configuration's adapter (same base weights and seed for all)."""
    import lorakit as lk

    model = copy.deepcopy(base) if base is not None else lk.build_model(MODEL, task="causal-lm", seed=0)
    lib, method = config.split("-")
    torch.manual_seed(0)
    if lib == "lk":
        lk.inject(model, lk.AdapterConfig(method=method, r=R, alpha=ALPHA, target_modules=TARGETS))
    else:
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=method == "dora")
        model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B so DoRA's norm and rescaling are exercised as in training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.train()


def batch() -> torch.Tensor:
    return torch.randint(0, 2000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds of all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def layer_times(base: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Median forward+backward time (ms) of one adapted q_proj per configuration, interleaved."""
    layers = {}
    for config in CONFIGS:
        model = build(config, base)
        layers[config] = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(BATCH * SEQ, 512, requires_grad=True)
    g = torch.randn(BATCH * SEQ, 512)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for i in range(repeats + 3):
        for config, layer in layers.items():
            t0 = time.perf_counter()
            layer(x).backward(g)
            if i >= 3:
                times[config].append(time.perf_counter() - t0)
            x.grad = None
            layer.zero_grad(set_to_none=True)
    return {c: 1e3 * statistics.median(t) for c, t in times.items()}


DECODE_DIM, DECODE_ROWS = 2048, 32
DECODE_CONFIGS = ("lk-lora", "lk-dora", "lk-dora-uncached", "peft-lora", "peft-dora")


def decode_layer(config: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """(module to call, lorakit DoRA adapter or None) for one decode configuration."""
    import lorakit as lk

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(DECODE_DIM, DECODE_DIM, bias=False)).to(dtype)
    lib, method = config.split("-")[:2]
    if lib == "lk":
        model = lk.inject(base, lk.AdapterConfig(method=method, r=R, alpha=ALPHA, target_modules=["0"]))
    else:
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], use_dora=method == "dora")
        model = peft.get_peft_model(base, cfg)  # adapters autocast to fp32, as lorakit's
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    dora = None
    if config == "lk-dora-uncached":
        dora = model[0].adapters["default"]
    return model.eval(), dora


def decode_times(repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per base dtype, per configuration: forward times (ms) of one decode step, interleaved."""
    out: dict[str, dict[str, list[float]]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        layers = {c: decode_layer(c, dtype) for c in DECODE_CONFIGS}
        x = torch.randn(DECODE_ROWS, 1, DECODE_DIM, generator=torch.Generator().manual_seed(0)).to(dtype)
        times: dict[str, list[float]] = {c: [] for c in DECODE_CONFIGS}
        with torch.inference_mode():
            for i in range(repeats + 5):
                for c, (layer, dora) in layers.items():
                    if dora is not None:
                        dora.invalidate_cache()
                    t0 = time.perf_counter()
                    layer(x)
                    if i >= 5:
                        times[c].append(1e3 * (time.perf_counter() - t0))
        out[str(dtype).removeprefix("torch.")] = times
    return out


def print_decode(decode: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Print the decode table; returns the ratios."""
    print(f"# decode: {DECODE_DIM}x{DECODE_DIM} linear, {DECODE_ROWS} rows x 1 token, eval, inference_mode")
    print(f"{'base':<9} " + " ".join(f"{c + ' ms':>20}" for c in DECODE_CONFIGS))
    ratios: dict[str, float] = {}
    for dtype, times in decode.items():
        print(f"{dtype:<9} " + " ".join(f"{statistics.median(times[c]):20.3f}" for c in DECODE_CONFIGS))

        def paired(a: str, b: str, t=times) -> float:
            return statistics.median(x / y for x, y in zip(t[a], t[b]))

        ratios[f"decode {dtype}: lk DoRA / lk LoRA"] = paired("lk-dora", "lk-lora")
        ratios[f"decode {dtype}: lk DoRA uncached / lk LoRA"] = paired("lk-dora-uncached", "lk-lora")
        ratios[f"decode {dtype}: PEFT DoRA / PEFT LoRA"] = paired("peft-dora", "peft-lora")
        ratios[f"decode {dtype}: lk DoRA / PEFT DoRA"] = paired("lk-dora", "peft-dora")
    for k, v in ratios.items():
        print(f"{k:<48} {v:6.3f}")
    return ratios


def peak_rss_child(config: str) -> None:
    """Subprocess body: same imports for every configuration, two steps, print ru_maxrss (MiB)."""
    import peft  # noqa: F401  (imported by every child so the baselines are equal)

    import lorakit  # noqa: F401

    torch.set_num_threads(THREADS)
    model = build(config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        step(model, opt, batch())
    print(json.dumps({"rss_mib": peak_rss_mib()}))


def peak_rss() -> dict[str, float]:
    """One fresh process per configuration, run two at a time (RSS is per process, not shared)."""
    out: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    for pair in (CONFIGS[:2], CONFIGS[2:]):
        procs = {
            c: subprocess.Popen(
                [sys.executable, __file__, "--child", c], stdout=subprocess.PIPE, text=True, env=env
            )
            for c in pair
        }
        for c, p in procs.items():
            stdout, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"peak-RSS subprocess for {c} failed with exit code {p.returncode}")
            out[c] = json.loads(stdout.strip().splitlines()[-1])["rss_mib"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    ap.add_argument("--layer-repeats", type=int, default=20, help="timed repeats of the single-layer test")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-configuration peak-RSS subprocesses")
    ap.add_argument("--decode-repeats", type=int, default=100, help="timed repeats of each decode step")
    ap.add_argument("--decode-only", action="store_true", help="run only the decode comparison")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        peak_rss_child(args.child)
        return 0
    torch.set_num_threads(THREADS)
    import peft

    import lorakit as lk

    t_start = time.perf_counter()
    if args.decode_only:
        print(f"# torch {torch.__version__}, peft {peft.__version__}, {THREADS} threads, load avg "
              f"{os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
        ratios = print_decode(decode_times(args.decode_repeats))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"decode_ratios": ratios}, f, indent=2)
        return 0
    base = lk.build_model(MODEL, task="causal-lm", seed=0)
    ids = batch()
    models = {c: build(c, base) for c in CONFIGS}
    opts = {
        c: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for c, m in models.items()
    }
    saved = {c: saved_bytes(m, ids) / 2**20 for c, m in models.items()}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for i in range(args.warmup + args.steps):  # interleaved: A B C D A B C D ...
        for c in CONFIGS:
            t, tc = step(models[c], opts[c], ids)
            if i >= args.warmup:
                times[c].append(t)
                cpu[c].append(tc)
    del models, opts
    layer = layer_times(base, args.layer_repeats)
    decode = decode_times(args.decode_repeats)
    rss = {} if args.no_rss else peak_rss()

    med = {c: statistics.median(t) for c, t in times.items()}
    med_cpu = {c: statistics.median(t) for c, t in cpu.items()}

    def paired(a: str, b: str) -> float:  # median over rounds of the per-round ratio (cancels slow spells)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(
        f"# DoRA benchmark: {MODEL}, r={R}, alpha={ALPHA}, {'+'.join(TARGETS)}, batch {BATCH}x{SEQ}, AdamW, "
        f"{THREADS} threads, torch {torch.__version__}, peft {peft.__version__}, cpu_count {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(
        f"{'config':<10} {'step s (median)':>15} {'min':>7} {'max':>7} {'CPU s':>7} {'layer ms':>9} "
        f"{'saved MiB':>10} {'peak RSS MiB':>13}"
    )
    for c in CONFIGS:
        rss_s = f"{rss[c]:13.0f}" if c in rss else f"{'-':>13}"
        print(
            f"{c:<10} {med[c]:15.3f} {min(times[c]):7.3f} {max(times[c]):7.3f} {med_cpu[c]:7.2f} "
            f"{layer[c]:9.2f} {saved[c]:10.1f} {rss_s}"
        )
    ratios = {
        "lk DoRA / lk LoRA step": med["lk-dora"] / med["lk-lora"],
        "lk DoRA / lk LoRA step (paired)": paired("lk-dora", "lk-lora"),
        "lk DoRA / lk LoRA step CPU": med_cpu["lk-dora"] / med_cpu["lk-lora"],
        "PEFT DoRA / PEFT LoRA step": med["peft-dora"] / med["peft-lora"],
        "PEFT DoRA / PEFT LoRA step (paired)": paired("peft-dora", "peft-lora"),
        "lk DoRA / PEFT DoRA step": med["lk-dora"] / med["peft-dora"],
        "lk DoRA / PEFT DoRA step (paired)": paired("lk-dora", "peft-dora"),
        "lk DoRA / PEFT DoRA step CPU": med_cpu["lk-dora"] / med_cpu["peft-dora"],
        "lk DoRA / lk LoRA layer": layer["lk-dora"] / layer["lk-lora"],
        "lk DoRA / PEFT DoRA layer": layer["lk-dora"] / layer["peft-dora"],
        "lk DoRA / PEFT DoRA saved-for-backward": saved["lk-dora"] / saved["peft-dora"],
    }
    if rss:
        ratios["lk DoRA / PEFT DoRA peak RSS"] = rss["lk-dora"] / rss["peft-dora"]
    for k, v in ratios.items():
        print(f"{k:<42} {v:6.3f}")
    ratios.update(print_decode(decode))
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "step_s": times,
                    "cpu_s": cpu,
                    "median_step_s": med,
                    "layer_ms": layer,
                    "saved_mib": saved,
                    "decode_ms": decode,
                    "peak_rss_mib": rss,
                    "ratios": ratios,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
