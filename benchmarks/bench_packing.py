"""Real tokens per second on real data: padded-to-max batches vs length-grouped vs packed (issue 9).

Model: builtin llama-15m (hidden 512, 4 layers, vocab 2000, random init), frozen, with PEFT LoRA on q_proj and
v_proj (r=8, alpha=16, dropout 0) and AdamW(lr=2e-4) -- a plain training step (forward + backward + step).
Data: ../shared/datasets/alpaca_1k (Alpaca prompt, loss on the response), lorakit byte tokenizer.
Same max length and batch size (rows) for every mode. Real tokens = non-padding tokens of the batches run.

Each (mode, round) runs in its own subprocess and modes are interleaved (ABCABC...) because these machines
are noisy; the figure per mode is the median over rounds of (real tokens / seconds) over the timed steps
(the first step of each process is a warm-up and not timed). Ratios are against "pad". Real tokens per
CPU-second (process time) is printed beside wall time: on a shared, oversubscribed machine it is the
steadier of the two.

    python benchmarks/bench_packing.py --max-length 512 1024 --steps 6 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ALPACA = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "datasets", "alpaca_1k", "alpaca_data_1k.json"
)


def worker(mode: str, max_length: int, batch_size: int, steps: int, round_: int, data: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.models import build_model
    from lorakit.models.tokenizer import ByteTokenizer, pad_id
    from lorakit.train.collate import BatchPlan, Collator
    from lorakit.train.data import read_records
    from lorakit.train.tasks import encode_records

    tok = ByteTokenizer()
    ds = encode_records(read_records(data), tok, "sft", max_length=max_length)
    plan_mode, _, variant = mode.partition("-")  # "pack-block": packing with an explicit 4D block mask
    attention = "block" if variant == "block" else "position_ids"
    plan = BatchPlan(ds.lengths, batch_size, plan_mode, max_length=max_length, seed=0)
    collate = Collator(pad_id(tok), plan_mode, max_length=max_length, pack_attention=attention)
    model = build_model("llama-15m", seed=0)
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = plan.batches(0)
    # The same slice of the epoch in every round: steps spread over the epoch, so long and short batches mix.
    stride = max(1, len(batches) // (steps + 1))
    chosen = [batches[(round_ + k * stride) % len(batches)] for k in range(steps + 1)]
    real = computed = 0
    t0 = c0 = 0.0
    losses = []
    for k, b in enumerate(chosen):
        if k == 1:
            t0, c0 = time.perf_counter(), time.process_time()
        batch = collate([[ds.examples[i] for i in row] for row in b])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if k >= 1:
            real += plan.real_tokens(b)
            computed += batch["input_ids"].numel()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    return {
        "mode": mode,
        "max_length": max_length,
        "round": round_,
        "steps": steps,
        "seconds": seconds,
        "real_tokens": real,
        "computed_tokens": computed,
        "real_tokens_per_s": real / seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens_per_cpu_s": real / cpu_seconds,
        "padding_fraction": 1 - real / computed,
        "examples": len(ds),
        "batches_per_epoch": len(batches),
        "first_loss": losses[0],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-length", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["pad", "group", "pack"],
        help="pad, group, pack, pack-block (packing with an explicit 4D block mask)",
    )
    ap.add_argument("--data", default=ALPACA)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(args.worker, args.max_length[0], args.batch_size, args.steps, args.round, args.data)
            )
        )
        return
    results = []
    for max_length in args.max_length:
        for r in range(args.rounds):
            for mode in args.modes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--max-length",
                    str(max_length),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                    "--round",
                    str(r),
                    "--data",
                    args.data,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                results.append(res)
                print(
                    f"  L={max_length} round {r} {mode:<10} {res['real_tokens_per_s']:8.0f} real tok/s "
                    f"(padding {100 * res['padding_fraction']:.1f}%)",
                    flush=True,
                )
    import torch
    import transformers

    print(
        f"\nllama-15m + PEFT LoRA q,v r=8, AdamW; alpaca_1k, byte tokens; batch {args.batch_size}; "
        f"{args.steps} timed steps x {args.rounds} rounds; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'max_len':>7} {'mode':<10} {'real tok/s':>10} {'vs pad':>7} {'tok/cpu-s':>10} {'vs pad':>7} {'padding':>8}"
    )
    summary = []
    for max_length in args.max_length:
        wall, cpu = {}, {}
        for mode in args.modes:
            rs = [x for x in results if x["mode"] == mode and x["max_length"] == max_length]
            wall[mode] = statistics.median(x["real_tokens_per_s"] for x in rs)
            cpu[mode] = statistics.median(x["real_tokens_per_cpu_s"] for x in rs)
            pad_frac = statistics.median(x["padding_fraction"] for x in rs)
            ratio = wall[mode] / wall["pad"] if "pad" in wall else float("nan")
            cpu_ratio = cpu[mode] / cpu["pad"] if "pad" in cpu else float("nan")
            summary.append(
                {
                    "max_length": max_length,
                    "mode": mode,
                    "real_tokens_per_s": wall[mode],
                    "ratio_vs_pad": ratio,
                    "real_tokens_per_cpu_s": cpu[mode],
                    "cpu_ratio_vs_pad": cpu_ratio,
                    "padding_fraction": pad_frac,
                }
            )
            print(
                f"{max_length:>7} {mode:<10} {wall[mode]:>10.0f} {ratio:>6.2f}x {cpu[mode]:>10.0f} {cpu_ratio:>6.2f}x "
                f"{100 * pad_frac:>7.1f}%"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
