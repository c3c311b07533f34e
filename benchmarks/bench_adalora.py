"""AdaLoRA (init_r 12 -> target_r 8) vs LoRA r=8: a short fine-tune with lorakit's trainer, and where
AdaLoRA's rank budget went.

    python benchmarks/bench_adalora.py --rows 1024 --lr 3e-3   # 64 steps each; ~25 min on 2 busy CPU cores
    python benchmarks/bench_adalora.py --rows 512 --out /tmp/ada   # quicker
    python benchmarks/bench_adalora.py --seeds 0,1,2 --adalora-lr 1e-2 --threads 1   # results/adalora.md
    python benchmarks/bench_adalora.py --methods adalora --seeds 0,1,2 --adalora-lr 1e-2 --threads 1 \
        --adalora-init orthogonal --tinit 0.2 --tfinal 0.3          # adalora.md round 2's pick

Setup (issue 6): builtin ``minilm`` (pretrained all-MiniLM-L6-v2, 6 layers) with a fresh 2-class head
(trained in full, as PEFT's SEQ_CLS does), SST-2 (``/work/shared/datasets/sst2``): ``--rows`` seeded random
training rows, the full GLUE dev set (872 rows) for evaluation, max_length 64, batch 16, one epoch, AdamW
lr ``--lr`` (default 1e-3) linear decay, no warmup, dropout 0, no gradient checkpointing, seed 0; both adapters on every linear layer of
the encoder (``all-linear``). Scaling per rank is equal: LoRA alpha 16 / r 8 = 2; AdaLoRA alpha 24 / init_r 12
= 2 (PEFT's alpha / ranknum). AdaLoRA: the AdapterConfig schedule defaults (tinit 10%, tfinal 40%,
delta_t 1% of the steps), orthogonal regulariser 0.5 (paper's squared form), beta1 = beta2 = 0.85.
Final budget: target_r 8 on every matrix, LoRA r 8's rank. AdaLoRA needs about 10x LoRA's rate in a run
this short (its singular values start at 0; ``lorakit.train.lr_rule``): pass ``--adalora-lr 1e-2``.
``--adalora-init``, ``--lambda-lr-ratio``, ``--tinit``, ``--tfinal``, ``--orth-reg-weight``, ``--init-r`` /
``--target-r`` (alpha = 2 init_r) change one AdaLoRA setting each; LoRA's side never changes.

Figures: accuracy and mean cross-entropy on the dev set after training (lorakit.train.evaluate),
mean training loss of the last 10 steps (metrics.jsonl; for AdaLoRA it includes the orthogonal penalty, as
the trainer logs task loss + extra_loss), trainable parameters at the start and
adapter tensors kept after pruning, the kept rank of every matrix (table + heatmap PNG
``adalora_ranks.png``). All numbers come from one process on one machine, the two runs back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
DATA = os.environ.get("LORAKIT_DATASETS", "/work/shared/datasets")


def run_config(
    method: str, rows: int, out: str, seed: int, lr: float = 1e-3, orth_form: str = "squared",
    orth_reg_weight: float = 0.5, init: str | None = None, lambda_lr_ratio: float | None = None,
    tinit: float | None = None, tfinal: float | None = None, init_r: int = 12, target_r: int = 8,
) -> dict:
    adapter = {"method": method, "dropout": 0.0, "target_modules": "all-linear"}
    if method == "lora":
        adapter.update(r=8, alpha=16.0)
    else:  # unset fields (init, λ rate, schedule) are AdapterConfig's defaults
        options = {"orth_form": orth_form}
        if lambda_lr_ratio is not None:
            options["lambda_lr_ratio"] = lambda_lr_ratio
        adapter.update(  # alpha / init_r = 2, LoRA's alpha / r
            init_r=init_r, target_r=target_r, alpha=2.0 * init_r, orth_reg_weight=orth_reg_weight,
            method_options=options,
        )
        adapter.update({k: v for k, v in (("init", init), ("tinit", tinit), ("tfinal", tfinal)) if v is not None})
    return {
        "model": {"name": "minilm"},
        "data": {
            "train": f"{DATA}/sst2/train.tsv",
            "validation": f"{DATA}/sst2/dev.tsv",
            "task": "classification",
            "fields": {"text": "sentence"},
            "max_length": 64,
            "max_train_rows": rows,
        },
        "adapter": adapter,
        "training": {
            "epochs": 1,
            "batch_size": 16,
            "grad_accumulation": 1,
            "lr": lr,
            "warmup_ratio": 0.0,
            "gradient_checkpointing": False,
            "eval_at_start": False,
            "seed": seed,
            "num_workers": 0,
            "device": "cpu",
        },
        "output": {"dir": os.path.join(out, method), "save_every": 0, "progress": False, "plot": False},
    }


def run_seed(args, seed: int, out: str) -> tuple[dict, object]:
    """LoRA then AdaLoRA (``--methods``) for one seed, back to back in this process."""
    from lorakit.bench.adalora_report import rank_report
    from lorakit.surgery.inject import adapted_layers
    from lorakit.train.callbacks import Callback
    from lorakit.train.config import RunConfig
    from lorakit.train.trainer import train

    class Grab(Callback):  # keeps the trained model so the reports read it after training
        def on_train_begin(self, state):
            self.model = state.model

    results, report = {}, None
    for method in args.methods.split(","):
        grab = Grab()
        lr = args.lr if method == "lora" else (args.adalora_lr or args.lr)
        cfg = RunConfig.from_dict(
            run_config(
                method, args.rows, out, seed, lr, args.orth_form, args.orth_reg_weight, args.adalora_init,
                args.lambda_lr_ratio, args.tinit, args.tfinal, args.init_r, args.target_r,
            )
        )
        res = train(cfg, overwrite=True, callbacks=[grab])
        model = grab.model
        with open(os.path.join(cfg.output.dir, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r and "lr" in r]
        kept = sum(
            t.numel()
            for _, layer in adapted_layers(model)
            for t in layer.adapters["default"].peft_state().values()
        )
        results[method] = {
            "steps": res.steps,
            "eval": res.eval_after,
            "train_loss_last10": sum(losses[-10:]) / 10,
            "trainable_params": res.summary["efficiency"]["trainable_params"],
            "adapter_tensors_kept": kept,
            "wall_time_s": res.summary["wall_time_s"],
            "lr": lr,
            "schedule": res.summary.get("adalora_schedule"),
        }
        if method == "adalora":
            report = rank_report(model)
            results[method]["ranks"] = report.as_dict()
            results[method]["heatmap"] = report.heatmap(
                os.path.join(out, "adalora_ranks.png"),
                "AdaLoRA kept ranks, MiniLM on SST-2 (init 12 -> target 8)",
            )
    return results, report


def summary_md(args, per_seed: dict[int, dict]) -> str:
    """adalora.md: accuracy per seed and mean for each method, AdaLoRA's gap to LoRA, kept singular values."""
    methods = list(next(iter(per_seed.values())))
    lines = [
        f"rows {args.rows}, seeds {args.seeds}, lr lora {args.lr:g} / adalora {args.adalora_lr or args.lr:g}, "
        f"orth {args.orth_form} x {args.orth_reg_weight:g}, init {args.adalora_init or 'default'}, "
        f"lambda lr ratio {args.lambda_lr_ratio if args.lambda_lr_ratio is not None else 'default'}, "
        f"tinit {args.tinit if args.tinit is not None else 'default'}, "
        f"tfinal {args.tfinal if args.tfinal is not None else 'default'}, torch threads {args.threads}",
        "",
        "| method | steps | dev accuracy per seed | mean | gap to LoRA (points) | singular values kept | wall s per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    accs = {m: [r[m]["eval"]["eval_accuracy"] for r in per_seed.values()] for m in methods}
    ref = sum(accs["lora"]) / len(accs["lora"]) if "lora" in accs else float("nan")
    for m in methods:
        runs = [r[m] for r in per_seed.values()]
        mean = sum(accs[m]) / len(accs[m])
        kept = ", ".join(
            f"{sum(x['rank'] for x in r['ranks']['rows'])}/{sum(x['init_r'] for x in r['ranks']['rows'])}"
            if "ranks" in r else "-" for r in runs
        )
        lines.append(
            f"| {m} | {runs[0]['steps']} | {', '.join(f'{a:.4f}' for a in accs[m])} | {mean:.4f} | "
            f"{100 * (mean - ref):+.2f} | {kept} | {', '.join(format(r['wall_time_s'], '.0f') for r in runs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048, help="training rows (seeded subset of SST-2 train)")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each writes OUT/seedN/")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA's learning rate")
    p.add_argument("--adalora-lr", type=float, default=None, help="AdaLoRA's (default: --lr)")
    p.add_argument("--methods", default="lora,adalora", help="which of lora,adalora to run (for two processes)")
    p.add_argument("--orth-form", default="squared", choices=("squared", "peft"))
    p.add_argument("--orth-reg-weight", type=float, default=0.5)
    p.add_argument("--adalora-init", default=None, choices=("default", "gaussian", "orthogonal"),
                   help="AdaLoRA's init of P, Q (default: AdapterConfig's)")
    p.add_argument("--lambda-lr-ratio", type=float, default=None,
                   help="AdaLoRA's lambda rate / --adalora-lr (default: AdapterConfig's)")
    p.add_argument("--tinit", type=float, default=None, help="AdaLoRA tinit (fraction; default: AdapterConfig's)")
    p.add_argument("--tfinal", type=float, default=None, help="AdaLoRA tfinal (fraction; default: AdapterConfig's)")
    p.add_argument("--init-r", type=int, default=12, help="AdaLoRA init_r (alpha = 2 init_r)")
    p.add_argument("--target-r", type=int, default=8, help="AdaLoRA target_r (8 = LoRA r 8's budget)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="/tmp/lorakit_bench_adalora")
    args = p.parse_args(argv)
    if args.seed is not None:
        args.seeds = str(args.seed)
    torch.set_num_threads(args.threads)

    per_seed, report = {}, None
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = os.path.join(args.out, f"seed{seed}")
        per_seed[seed], rep = run_seed(args, seed, out)
        report = rep or report
        results = per_seed[seed]
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nseed {seed}")
        print(
            f"{'method':<8} {'steps':>5} {'dev acc':>8} {'dev loss':>8} {'train loss':>10} {'trainable':>10} "
            f"{'kept adapter':>12} {'time s':>7}"
        )
        for m, r in results.items():
            ev = r["eval"] or {}
            print(
                f"{m:<8} {r['steps']:>5} {ev.get('eval_accuracy', float('nan')):>8.4f} "
                f"{ev.get('eval_loss', float('nan')):>8.4f} {r['train_loss_last10']:>10.4f} "
                f"{r['trainable_params']:>10,} {r['adapter_tensors_kept']:>12,} {r['wall_time_s']:>7.1f}"
            )
    if report is not None:
        print()
        print(report.table())
        layers, kinds, cells = report.grid()
        print("\nlayer x type: " + " ".join(kinds))
        for layer, row in zip(layers, cells):
            print(f"  {layer}: {row}")
    md = summary_md(args, per_seed)
    print("\n" + md)
    with open(os.path.join(args.out, "adalora.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "per_seed": per_seed}, f, indent=1)
    print(f"\nwrote {args.out}/adalora.md, {args.out}/results.json and {args.out}/seed*/adalora_ranks.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
