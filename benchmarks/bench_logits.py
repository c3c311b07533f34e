"""No wasted logits (issue 16 item 3): peak RSS and step time of LoRA training steps on a real vocabulary,
lorakit's loss (LM head only on target rows, chunked fp32 cross-entropy recomputed in backward) vs PEFT +
transformers (full-vocabulary logits for every position, cast to fp32 by transformers' loss).

Model: random-init Qwen2.5-0.5B shape (transformers ``Qwen2Config``: vocab 151,936, hidden 896, 24 layers,
14 heads / 2 KV heads, intermediate 4,864, tied embeddings), the same weights on every side (seed 0).
LoRA r 8, alpha 16, dropout 0 on every linear layer but the head ("all-linear" on both sides). Batch: 2 rows
x 1,024 synthetic tokens (seed 0), the first half of each row a prompt (label -100): completion-only loss.
bf16 autocast on every side, no gradient checkpointing, AdamW lr 2e-4, ``--steps`` steps.

Sides, each in its own process, run one after another (never at once), interleaved over ``--rounds``:
- ``lorakit``: as the trainer runs it: frozen base kept in bf16 (``model.dtype: bf16``; adapter weights
  fp32), ``TaskLoss``, ``training.return_freed_memory`` (its default: freed tensors of 16 MiB and more go back
  to the OS, ``lorakit.train.host_memory``);
- ``lorakit-glibc``: the same with glibc's default allocator policy (``return_freed_memory: false``);
- ``lorakit-fp32base``: the same loss with the fp32 base, to separate the loss's share from the base dtype's;
- ``peft``: PEFT ``get_peft_model`` + ``model(**batch, labels=...).loss`` (transformers' own loss).

Figures: peak RSS of the training steps (VmHWM after resetting it through /proc/self/clear_refs once the
model is built; includes the resident model), peak RSS of the whole process (ru_maxrss, includes building
the model), each step's wall time, the loss at step 1 (equal: the adapters' B is zero at step 1, so both
sides compute the base model's loss) and the target count. Medians over rounds; ratios against PEFT.

    python benchmarks/bench_logits.py --rounds 2 --steps 2 [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIDES = ("lorakit", "lorakit-glibc", "lorakit-fp32base", "peft")
QWEN25_05B = dict(
    vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4_864, max_position_embeddings=32_768, tie_word_embeddings=True, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, use_cache=False,
)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _batch(rows: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half: no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def worker(side: str, rows: int, seq: int, steps: int, threads: int, layers: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    if side == "lorakit":
        from lorakit.train.host_memory import return_freed_memory

        assert return_freed_memory() is None  # what the trainer applies by default
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}))
    batch = _batch(rows, seq, model.config.vocab_size)
    n_tgt = int((batch["labels"][:, 1:] != -100).sum())
    if side == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))

        def loss_of():
            return model(**batch).loss  # transformers' mean over targets
    else:
        import lorakit
        from lorakit.train.loss import TaskLoss

        if side in ("lorakit", "lorakit-glibc"):
            model.to(torch.bfloat16)  # the frozen base in bf16 (what model.dtype: bf16 builds)
        lorakit.inject(model, lorakit.AdapterConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapter weights in fp32, as the trainer keeps them
        loss_fn = TaskLoss(model, "sft")
        assert loss_fn.path == "chunked", loss_fn.why

        def loss_of():
            return loss_fn(batch)[0] / n_tgt  # the trainer's normalisation: summed loss / targets

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    rss_model = _vm_kib("VmRSS")
    reset = _reset_peak()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {
        "side": side,
        "step_s": times,
        "loss": losses,
        "targets": n_tgt,
        "trainable": sum(p.numel() for p in params),
        "rss_model_mb": rss_model / 1024,
        "peak_train_mb": _vm_kib("VmHWM") / 1024 if reset else None,
        "peak_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _spawn(side: str, a: argparse.Namespace) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.bench_logits", "--worker", side, "--rows", str(a.rows),
           "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads), "--layers", str(a.layers)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode != 0:
        return {"side": side, "error": "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for side, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[side] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        med = statistics.median
        out[side] = {
            "peak_train_mb": med(r["peak_train_mb"] or 0.0 for r in ok),
            "peak_process_mb": med(r["peak_process_mb"] for r in ok),
            "rss_model_mb": med(r["rss_model_mb"] for r in ok),
            "step_s": med(t for r in ok for t in r["step_s"]),
            "loss_step1": ok[0]["loss"][0],
            "trainable": ok[0]["trainable"],
            "targets": ok[0]["targets"],
            "runs": len(ok),
        }
    return out


def _table(s: dict[str, dict]) -> str:
    peer = s.get("peft", {})
    lines = ["| side | peak RSS, steps (MB) | x PEFT | peak RSS, process (MB) | step s | x PEFT | loss @1 |",
             "|---|---|---|---|---|---|---|"]
    for side, r in s.items():
        if "error" in r:
            lines.append(f"| {side} | error: {r['error'][-120:]} |")
            continue
        rm = r["peak_train_mb"] / peer["peak_train_mb"] if peer.get("peak_train_mb") else float("nan")
        rt = r["step_s"] / peer["step_s"] if peer.get("step_s") else float("nan")
        lines.append(f"| {side} | {r['peak_train_mb']:.0f} | {rm:.2f} | {r['peak_process_mb']:.0f} | "
                     f"{r['step_s']:.2f} | {rt:.2f} | {r['loss_step1']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24, help="fewer for a quick check of the script")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", help="also write the runs and the summary here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.rows, a.seq, a.steps, a.threads, a.layers)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in a.sides}
    for rnd in range(a.rounds):
        for side in a.sides if rnd % 2 == 0 else reversed(a.sides):  # ABC CBA: drift hits every side alike
            r = _spawn(side, a)
            runs[side].append(r)
            print(f"round {rnd} {side}: {json.dumps(r)}", file=sys.stderr, flush=True)
    s = _summary(runs)
    losses = [r["loss_step1"] for r in s.values() if "loss_step1" in r]
    print(_table(s))
    if losses:
        print(f"loss at step 1: max difference between sides {max(losses) - min(losses):.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs, "summary": s}, f, indent=1)


if __name__ == "__main__":
    main()
