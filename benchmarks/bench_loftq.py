"""LoftQ's quantization error removed, lorakit vs PEFT, on real pretrained weights (all-MiniLM-L6-v2).

    python benchmarks/bench_loftq.py [--ranks 8,16,64] [--out benchmarks/results]

For every nn.Linear of the model (6 layers x q, k, v, attention output, intermediate, output, and the
pooler: 37 weights) and each rank r: ||W - Q||_F and ||W - (Q + s B A)||_F summed in quadrature over the layers,
with Q = lorakit's NF4 (block 64, no double quantization, as PEFT's LoftQ) and A, B from lorakit's
``init="loftq"``; beside it the same measure for PEFT 0.21.2's ``loftq_init`` on the same W (its
hard-coded "cuda" compute device swapped for "cpu", nothing else changed), at loftq_iter 1 (PEFT's
default, the same computation) and 5 (PEFT alternates: its Q then differs from NF4(W), so its base
changes). Last, the QLoRA model as a whole: the distance of its sentence embeddings (mean-pooled last
hidden state, 16 SST-2 sentences) from the fp32 model's, with LoRA's default init (B = 0) and with
LoftQ (all linear layers, r = 16, alpha = 16). Deterministic: no timing, so the machine's load does not
matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import types

import torch


def peft_loftq_on_cpu():
    from peft.utils import loftq_utils

    f = loftq_utils.loftq_init.__wrapped__
    consts = tuple("cpu" if c == "cuda" else c for c in f.__code__.co_consts)
    return torch.no_grad()(types.FunctionType(f.__code__.replace(co_consts=consts), f.__globals__))


def lorakit_loftq(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, s B A) of lorakit's LoftQ on one weight."""
    import lorakit as lk
    from lorakit.adapters.lora_init import full_precision
    from lorakit.config import QuantConfig
    from lorakit.quant import quantize

    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quantize(model, QuantConfig(double_quant=False, compute_dtype="fp32"))
    with full_precision({"0": w}):
        lk.inject(model, lk.AdapterConfig(init="loftq", r=r, alpha=16, target_modules=["0"]))
    layer = model[0]
    return layer.access.dense_weight(torch.float32), layer.adapters["default"].delta_weight(layer.access)


def weight_errors(ranks: list[int]) -> dict:
    import lorakit as lk

    model = lk.build_model("minilm", task="base").float()
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_loftq = peft_loftq_on_cpu()
    out = {"layers": len(weights), "params": sum(w.numel() for w in weights.values()), "by_rank": {}}
    for r in ranks:
        sums = dict(before=0.0, lorakit=0.0, peft_iter1=0.0, peft_before=0.0, peft_iter5=0.0, norm=0.0)
        for w in weights.values():
            q, delta = lorakit_loftq(w, r)
            sums["norm"] += w.norm().item() ** 2
            sums["before"] += (w - q).norm().item() ** 2
            sums["lorakit"] += (w - q - delta).norm().item() ** 2
            deq, a, b = peft_loftq(w, num_bits=4, reduced_rank=r, num_iter=1)
            sums["peft_before"] += (w - deq).norm().item() ** 2
            sums["peft_iter1"] += (w - deq - b @ a).norm().item() ** 2
            deq, a, b = peft_loftq(w, num_bits=4, reduced_rank=r, num_iter=5)
            sums["peft_iter5"] += (w - deq - b @ a).norm().item() ** 2
        out["by_rank"][r] = {k: math.sqrt(v) for k, v in sums.items()}
    return out


def embedding_gap() -> dict:
    import lorakit as lk
    from lorakit.adapters.lora_init import dense_weights, full_precision
    from lorakit.config import QuantConfig
    from lorakit.models.tokenizer import load_tokenizer
    from lorakit.quant import eligible_layers, quantize

    with open("/work/shared/datasets/sst2/dev.tsv", encoding="utf-8") as f:
        sentences = [line.split("\t")[0].strip() for line in f.readlines()[1:17]]
    tok = load_tokenizer("minilm")
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    full = embed(lk.build_model("minilm", task="base").float())
    qcfg = QuantConfig(compute_dtype="fp32")
    gaps = {}
    for init in ("default", "loftq"):
        model = lk.build_model("minilm", task="base").float()
        dense = dense_weights(eligible_layers(model, qcfg))
        quantize(model, qcfg)
        with full_precision(dense):
            lk.inject(model, lk.AdapterConfig(init=init, r=16, alpha=16, target_modules="all-linear"))
        e = embed(model)
        gaps[init] = {"rel_l2": ((e - full).norm() / full.norm()).item(),
                      "cosine_min": torch.nn.functional.cosine_similarity(e, full).min().item()}
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small SVDs: 2 threads were 100x slower on the shared (loaded) machine
    res = {"weights": weight_errors([int(r) for r in args.ranks.split(",")]), "embeddings": embedding_gap()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loftq.json"), "w") as f:
        json.dump(res, f, indent=2)
    w = res["weights"]
    lines = [f"# LoftQ on all-MiniLM-L6-v2 ({w['layers']} linear weights, {w['params']:,} params; NF4 block 64)", "",
             "| r | ||W-Q|| (lorakit NF4) | after lorakit LoftQ | PEFT ||W-Q|| | after PEFT iter 1 | after PEFT iter 5 |",
             "|---|---|---|---|---|---|"]
    for r, v in w["by_rank"].items():
        lines.append(f"| {r} | {v['before']:.4f} | {v['lorakit']:.4f} ({1 - v['lorakit'] / v['before']:.1%} removed) | "
                     f"{v['peft_before']:.4f} | {v['peft_iter1']:.4f} | {v['peft_iter5']:.4f} |")
    lines += ["", f"||W||_F over the same layers: {next(iter(w['by_rank'].values()))['norm']:.2f}", "",
              "QLoRA at the start vs the fp32 model (sentence embeddings, 16 SST-2 dev sentences, all-linear r=16):", ""]
    for init, g in res["embeddings"].items():
        lines.append(f"- init={init}: relative L2 gap {g['rel_l2']:.4f}, min cosine {g['cosine_min']:.5f}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "loftq.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
