"""Mixed-adapter batches: lorakit (stacked gather + bmm) vs PEFT (``adapter_names=``, a loop per adapter).

    python benchmarks/bench_mixed.py [--adapters 16 64] [--rows 32] [--repeats 40] [--prefill-repeats 8]
                                     [--shapes step decode prefill] [--threads N]

Model: builtin llama-15m (hidden 512, 4 layers), fp32, CPU, eval + inference_mode. N adapters of r=8 on
q_proj, v_proj (random non-zero weights; the same tensors in lorakit and PEFT). Shapes:
- step: 1 token per row, no KV cache (the per-layer adapter cost with the least else around it);
- decode: 1 new token per row on top of a KV cache of 64 prompt tokens per row (the cache is cropped back
  to 64 after each timed call, outside the timing), the same for every variant;
- prefill: 128 tokens per row, no cache.
Variants: base (adapters disabled), single (every row on adapter 0), mixed (row i on adapter i mod N, passed
as ``model(..., adapter_names=...)`` on both sides, so lorakit's per-call routing set-up is timed too), mixed
ctx (the same rows inside one ``adapter_rows`` block, set up outside the timing), plus lorakit's
segment-by-adapter alternative (a loop over the adapters present, for comparison only).
Every repeat runs every variant once, in a rotating order (interleaved); figures are medians in ms, and
the ratios also as the median of per-repeat ratios (paired). Goals (serving issue, the step shape): lorakit
mixed <= 1.15x lorakit single, PEFT mixed >= 1.5x lorakit mixed. With ``OMP_WAIT_POLICY=PASSIVE`` (the
README's advice on a busy machine) every small batched matmul also pays a thread wake-up (~0.1 ms on 2
threads), which lorakit's mixed path has two of per layer and the single path none: compare like with like.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lorakit
from lorakit.serving.mixed import adapter_rows

TARGETS = ["q_proj", "v_proj"]


def build_pair(n_adapters: int, seed: int = 0):
    """A lorakit model and a PEFT model on identical base weights, with identical adapters a0..aN-1."""
    from peft import LoraConfig, get_peft_model

    ours = lorakit.build_model("llama-15m", seed=seed)
    theirs = lorakit.build_model("llama-15m", seed=seed)
    names = [f"a{i}" for i in range(n_adapters)]
    gen = torch.Generator().manual_seed(1)
    peft_model = None
    for name in names:
        lorakit.inject(
            ours, lorakit.AdapterConfig(r=8, alpha=16, target_modules=TARGETS), name, activate=False
        )
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(theirs, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():
        for path, layer in lorakit.surgery.inject.adapted_layers(ours):
            peft_layer = peft_model.base_model.model.get_submodule(path)
            for name in names:
                ad = layer.adapters[name]
                a = torch.randn(ad.lora_A.weight.shape, generator=gen) * 0.05
                b = torch.randn(ad.lora_B.weight.shape, generator=gen) * 0.05
                ad.lora_A.weight.copy_(a)
                ad.lora_B.weight.copy_(b)
                peft_layer.lora_A[name].weight.copy_(a)
                peft_layer.lora_B[name].weight.copy_(b)
    return ours.eval(), peft_model.eval(), names


class SegmentRouter:
    """Segment-by-adapter alternative (benchmark only): sort rows by adapter, one matmul pair per segment."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, layer, x, out):
        out = out.clone()
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            groups.setdefault(n, []).append(i)
        for n, rows in groups.items():
            idx = torch.tensor(rows)
            out[idx] = layer.adapters[n](x[idx], out[idx], layer.access)
        return out


def variants(ours, peft_model, names, rows):
    mixed = [names[i % len(names)] for i in range(rows)]

    def lk_base(call):
        with lorakit.disabled(ours):
            return call(ours)

    def lk_single(call):
        lorakit.set_adapter(ours, names[0])
        return call(ours)

    def lk_mixed(call):
        return call(ours, adapter_names=mixed)

    def lk_mixed_ctx(call):
        with adapter_rows(ours, mixed):
            return call(ours)

    def lk_segment(call):
        layers = [m for _, m in lorakit.surgery.inject.adapted_layers(ours)]
        router = SegmentRouter(mixed)
        for m in layers:
            m.row_routing = router
        try:
            return call(ours)
        finally:
            for m in layers:
                m.row_routing = None

    def pf_base(call):
        with peft_model.disable_adapter():
            return call(peft_model)

    def pf_single(call):  # PEFT's plain single-adapter batch (no adapter_names)
        peft_model.set_adapter(names[0])
        return call(peft_model)

    def pf_mixed(call):
        return call(peft_model, adapter_names=mixed)

    return {
        "lorakit base": lk_base,
        "lorakit single": lk_single,
        "lorakit mixed": lk_mixed,
        "lorakit mixed ctx": lk_mixed_ctx,
        "lorakit segment": lk_segment,
        "peft base": pf_base,
        "peft single": pf_single,
        "peft mixed": pf_mixed,
    }


def measure(ours, peft_model, names, rows, shape, repeats):
    gen = torch.Generator().manual_seed(2)
    if shape == "step":
        step = torch.randint(3, 2000, (rows, 1), generator=gen)

        def call(model, **kw):
            t = time.perf_counter()
            model(step, use_cache=False, **kw)
            return time.perf_counter() - t
    elif shape == "decode":
        prompt = torch.randint(3, 2000, (rows, 64), generator=gen)
        step = torch.randint(3, 2000, (rows, 1), generator=gen)
        caches = {}
        with torch.inference_mode():
            for key, model in (("ours", ours), ("peft", peft_model)):
                caches[key] = model(prompt, use_cache=True).cache
        mask = torch.ones(rows, 65, dtype=torch.long)
        pos = torch.full((rows, 1), 64)

        def call(model, **kw):
            cache = caches["peft" if model is peft_model else "ours"]
            t = time.perf_counter()
            model(step, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, **kw)
            dt = time.perf_counter() - t
            cache.crop(-1)  # back to the 64 prompt tokens
            return dt
    else:
        tokens = torch.randint(3, 2000, (rows, 128), generator=gen)

        def call(model, **kw):
            t = time.perf_counter()
            model(tokens, **kw)
            return time.perf_counter() - t

    fns = variants(ours, peft_model, names, rows)
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    with torch.inference_mode():
        for k in keys:  # warm up (and build lorakit's stacks once)
            fns[k](call)
        for rep in range(repeats):
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for k in order:
                times[k].append(fns[k](call))
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of num/den timed in the same repeat (steadier than a ratio of medians)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def check_equal(ours, peft_model, names, rows) -> float:
    mixed = [names[i % len(names)] for i in range(rows)]
    x = torch.randint(3, 2000, (rows, 16))
    with torch.inference_mode():
        a = ours(x, adapter_names=mixed).logits
    with torch.inference_mode():
        b = peft_model(x, adapter_names=mixed).logits
    return (a - b).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[16, 64])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--prefill-repeats", type=int, default=8)
    p.add_argument(
        "--shapes", nargs="+", default=["step", "decode", "prefill"], choices=["step", "decode", "prefill"]
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.rows}, llama-15m fp32 CPU"
    )
    for n in args.adapters:
        ours, peft_model, names = build_pair(n)
        print(
            f"\n== {n} adapters r=8 on q_proj,v_proj; max |lorakit mixed - peft mixed| logits = "
            f"{check_equal(ours, peft_model, names, args.rows):.2e}"
        )
        for shape in args.shapes:
            reps = args.prefill_repeats if shape == "prefill" else args.repeats
            times = measure(ours, peft_model, names, args.rows, shape, reps)
            res = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            what = {"step": "1 token/row, no cache", "decode": "1 token/row, KV cache 64"}
            print(
                f"-- {shape} ({what.get(shape, '128 tokens/row')}), median ms over {reps} interleaved repeats"
            )
            for k, v in res.items():
                print(f"   {k:18s} {v:8.2f}")
            print(
                f"   ratios of medians (paired medians): "
                f"lorakit mixed / lorakit single = {res['lorakit mixed'] / res['lorakit single']:.3f} "
                f"({paired(times, 'lorakit mixed', 'lorakit single'):.3f}), goal <= 1.15;  "
                f"peft mixed / lorakit mixed = {res['peft mixed'] / res['lorakit mixed']:.2f}x "
                f"({paired(times, 'peft mixed', 'lorakit mixed'):.2f}x), goal >= 1.5x\n"
                f"   lorakit mixed ctx / lorakit single = "
                f"{res['lorakit mixed ctx'] / res['lorakit single']:.3f}   "
                f"peft mixed / peft single = {res['peft mixed'] / res['peft single']:.2f}   "
                f"lorakit segment / lorakit mixed = {res['lorakit segment'] / res['lorakit mixed']:.2f}"
            )


if __name__ == "__main__":
    main()
