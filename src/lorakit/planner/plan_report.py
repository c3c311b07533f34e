"""Rendering a :class:`lorakit.planner.plan.Plan`: terminal table, JSON, markdown report + PNG chart."""

from __future__ import annotations

import json
import os

from lorakit.io.atomic import atomic_write, atomic_write_text
from lorakit.planner.cost import GIB
from lorakit.planner.plan import Plan, launch_command


def _fmt_money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _fmt_h(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def method_rows(p: Plan) -> list[list[str]]:
    rows = [
        [
            "method",
            "trainable",
            "GiB/GPU (1 GPU)",
            "GPUs",
            "GiB/GPU",
            "hours",
            "train cost",
            "serve/month",
            "ROI",
            "payback (months)",
        ]
    ]
    no_benefit = p.benefit_per_month == 0  # ROI would read -100%: a cost, not a finding
    for m, mp in p.methods.items():
        roi = None if no_benefit else mp.roi
        rows.append(
            [
                m + (" *" if m == p.setup.method else ""),
                f"{mp.trainable_params:,}",
                f"{mp.single_gpu_memory.total / GIB:,.1f}",
                "-" if mp.gpus is None else str(mp.gpus),
                "-" if mp.memory is None else f"{mp.memory.total / GIB:,.1f}",
                _fmt_h(mp.hours),
                _fmt_money(mp.training_cost),
                _fmt_money(mp.serving_cost_per_month),
                "-" if roi is None or roi.roi is None else f"{roi.roi:+.1%}",
                "-" if roi is None or roi.payback_months is None else f"{roi.payback_months:,.3g}",
            ]
        )
    return rows


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(p: Plan) -> str:
    """The terminal view: header, per-method table, memory breakdown of the selected method, advice."""
    a, sel = p.arch, p.selected
    head = (
        f"{p.model}: {a.name} ({a.family}), {p.params.total:,} params; {p.total_tokens:,.0f} training tokens "
        f"({p.tokens_per_epoch:,} x {p.epochs:g} epochs); GPU {p.gpu.name} "
        f"({p.gpu.memory_gb} GiB, ${p.gpu.price_per_hour}/h)"
    )
    mem = sel.memory.as_gib() if sel.memory else sel.single_gpu_memory.as_gib()
    breakdown = ", ".join(f"{k} {v:,.2f}" for k, v in mem.items() if k != "total")
    lines = [
        head,
        "",
        _grid(method_rows(p)),
        *(["ROI: no benefit given (pass --benefit-per-month USD to price one)"] if p.benefit_per_month == 0 else []),
        "",
        f"{sel.method} memory per GPU (GiB): {breakdown}; total {mem['total']:,.2f}",
        f"{sel.method} FLOPs/token {sel.flops_per_token:,.4g} (6N = {6 * p.params.matmul:,.4g}); total "
        f"{sel.total_flops:,.4g} at MFU {sel.mfu:.2f}",
        f"run it: {launch_command(p)}",
        "",
        "Recommendations:",
    ]
    lines += [f"- {r}" for r in p.recommendations]
    lines += ["", "Assumptions:"] + [f"- {r}" for r in p.assumptions]
    return "\n".join(lines)


def to_json(p: Plan) -> str:
    return json.dumps(p.as_dict(), indent=2, default=str)


def write_chart(p: Plan, path: str) -> None:
    """Bar chart: training cost and peak memory per GPU for each method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(p.methods)
    costs = [p.methods[m].training_cost or 0.0 for m in names]
    mems = [p.methods[m].single_gpu_memory.total / GIB for m in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar(names, costs, color="#4c72b0")
    ax1.set_title(f"training cost on {p.gpu.name} (USD)")
    for i, m in enumerate(names):
        if p.methods[m].training_cost is None:
            ax1.text(i, 0, "does not fit", ha="center", va="bottom", rotation=90, fontsize=8)
    ax2.bar(names, mems, color="#dd8452")
    ax2.axhline(p.gpu.memory_gb, color="k", linestyle="--", linewidth=1, label=f"{p.gpu.name} memory")
    ax2.set_title("peak memory on one GPU (GiB)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{p.arch.name}: {p.total_tokens:,.0f} tokens", fontsize=10)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def markdown(p: Plan, chart_name: str | None = "plan_chart.png") -> str:
    rows = method_rows(p)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    sel = p.selected
    mem = (sel.memory or sel.single_gpu_memory).as_gib()
    out = [
        f"# Fine-tuning plan: {p.arch.name}",
        "",
        f"{p.params.total:,} parameters; {p.total_tokens:,.0f} training tokens; GPU {p.gpu.name}; "
        f"selected method **{sel.method}** (marked *).",
        "",
    ]
    if chart_name:
        out += [f"![cost and memory per method]({chart_name})", ""]
    out += md + ["", f"## Memory per GPU for {sel.method} (GiB)", "", "| component | GiB |", "|---|---|"]
    out += [f"| {k} | {v:,.2f} |" for k, v in mem.items()]
    out += ["", "## Run it", "", f"    {launch_command(p)}"]
    out += ["", "## Recommendations", ""] + [f"- {r}" for r in p.recommendations]
    out += ["", "## Assumptions", ""] + [f"- {r}" for r in p.assumptions]
    out += [
        "",
        "## Formulas",
        "",
        "- Weights: bf16 2 B/param, fp32 4, NF4 with double quantization 4.127 bits (QLoRA). Trainable params "
        "add grads + AdamW m, v; mixed-precision full FT = 2+2+4+4+4 = 16 B/param (ZeRO).",
        "- Activations: per-token tally of saved tensors after Korthikanti et al. 2022, sbh(34 + 5as/h) for a "
        "16-bit GPT layer; checkpointing keeps 2sbh per layer plus one recomputed layer.",
        "- Multi-GPU: DDP memory per GPU = one GPU's + DDP's gradient buckets (a copy of the trainable "
        "gradients); FSDP = weights, gradients and optimizer states / GPUs + the root's parameters and two "
        "blocks gathered in flight, activations unchanged; time divided by the GPUs.",
        "- FLOPs/token: full 6N_mm + 3 attention; LoRA 4N_mm + 3 attention + 6 N_adapter; +1 forward when "
        "checkpointing. Time = FLOPs / (GPUs x peak x MFU); cost = hours x GPUs x price.",
        "- ROI = (benefit - cost) / cost over the horizon, cost = training + serving; payback = training cost / "
        "(benefit - serving) per month.",
    ]
    return "\n".join(out) + "\n"


def write_report(p: Plan, out_dir: str) -> dict[str, str]:
    """Write ``plan.md``, ``plan_chart.png`` and ``plan.json`` into ``out_dir`` (atomic writes)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (("markdown", "plan.md"), ("chart", "plan_chart.png"), ("json", "plan.json"))
    }
    write_chart(p, paths["chart"])
    atomic_write_text(paths["json"], to_json(p))
    atomic_write_text(paths["markdown"], markdown(p, os.path.basename(paths["chart"])))
    return paths
