"""Recommendations and assumptions for a :class:`lorakit.planner.plan.Plan`, each tied to a number.

What is recommended, and why:
- the cheapest method that fits the chosen GPU, against full fine-tuning's cost;
- the cheapest GPU type for the requested method;
- a rank range and targets by task complexity: r 1-4 on Wq, Wv already matches full fine-tuning of
  GPT-3 on several tasks (Hu et al. 2021, Table 6; "attention layers first"); QLoRA needed adapters on
  all linear layers to match 16-bit full fine-tuning (Dettmers et al. 2023, section 4);
- the risks the source note lists (performance loss, stability, compatibility, cost overrun, delay,
  user satisfaction / data quality), each with the figure that sizes it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lorakit.planner.cost import GIB, Setup, trainable_params

if TYPE_CHECKING:
    from lorakit.models.families import Family
    from lorakit.planner.gpus import Gpu
    from lorakit.planner.plan import Plan

# task complexity -> (low rank, high rank, targets): attention projections by role (q, k, v, o: named per
# family by lorakit.models.families), or a target_modules string
RANKS = {
    "simple": (4, 8, ("q", "v")),
    "moderate": (8, 16, ("q", "k", "v", "o")),
    "complex": (16, 64, "all-linear"),
}
NF4_MEAN_ABS_ERROR = 0.0728  # measured here: bitsandbytes NF4 on a 4096x4096 N(0,1) matrix (REFERENCE.md)


def _money(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f} GiB"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.1f} GB"


def _targets_for(family: Family, spec: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """Attention roles as this family's target names (the shortest unambiguous ending of each path)."""
    if isinstance(spec, str):
        return spec
    return tuple(dict.fromkeys(family.short_name(getattr(family, role)) for role in spec))


def recommendations(p: Plan, table: dict[str, Gpu], complexity: str) -> list[str]:
    out: list[str] = []
    sel, gpu = p.selected, p.gpu
    fitting = {m: mp for m, mp in p.methods.items() if mp.fits and mp.training_cost is not None}
    cheapest = min(fitting.values(), key=lambda mp: (mp.training_cost, mp.gpus))
    spare = gpu.memory_gb * GIB - cheapest.memory.total
    full = p.methods["full"]
    vs_full = (
        f"; full fine-tuning needs {full.gpus} x {gpu.name} and costs {_money(full.training_cost)}"
        if full.fits
        else f"; full fine-tuning does not fit one {gpu.name} (DDP keeps a whole copy on every GPU)"
        if p.setup.distributed == "ddp"
        else f"; full fine-tuning does not fit {gpu.name} GPUs even sharded"
    )
    out.append(
        f"Cheapest method that fits: {cheapest.method} at {_money(cheapest.training_cost)} "
        f"({cheapest.hours:,.2f} h on {cheapest.gpus} x {gpu.name}, {_gib(spare)} to spare per GPU){vs_full}."
    )
    # cheapest GPU type for the selected method (same FLOPs, MFU and formulas on each)
    best = None
    for name, k in sel.fits_on.items():
        g = table.get(name, gpu if name == gpu.name else None)
        if k is None or g is None:
            continue
        cost = sel.total_flops / (k * g.peak_tflops * 1e12 * sel.mfu) / 3600 * k * g.price_per_hour
        if best is None or cost < best[0]:
            best = (cost, name, k)
    if best is not None:
        out.append(
            f"Cheapest GPU type for {sel.method}: {best[2]} x {best[1]} at {_money(best[0])} "
            f"(vs {_money(sel.training_cost)} on {sel.gpus} x {gpu.name}), at the table's prices."
        )
    lo, hi, spec = RANKS[complexity]
    tspec = _targets_for(p.arch.layout, spec)
    sizes = []
    for r in (lo, hi):
        try:
            n = trainable_params(p.arch, dataclasses.replace(p.setup, method="lora", r=r, targets=tspec))
        except ValueError:
            n = None
        sizes.append(n)
    if None not in sizes:
        shown = tspec if isinstance(tspec, str) else ", ".join(tspec)
        out.append(
            f"Rank for a {complexity} task: r={lo}-{hi} on {shown} = {sizes[0]:,}-{sizes[1]:,} trainable "
            f"params ({_mb(2 * sizes[0])}-{_mb(2 * sizes[1])} adapter file in fp16); attention layers "
            "first (LoRA paper: r=1-4 on Wq,Wv already matched full FT on GPT-3), all linear layers for "
            "complex tasks (QLoRA)."
        )
    out.append(
        f"Adapter checkpoint: {_mb(sel.checkpoint_bytes)} for {sel.method} vs {_mb(2 * p.params.total)} "
        f"for a full copy of {p.arch.name} ({sel.trainable_pct:.3f}% of parameters train)."
    )
    out += _risks(p, cheapest.method)
    return out


def _risks(p: Plan, cheapest: str) -> list[str]:
    sel = p.selected
    out = []
    if sel.method != "full":
        out.append(
            f"Risk, performance loss: only {sel.trainable_pct:.3f}% of parameters train; compare with a "
            "held-out evaluation (LLaMA-7B commonsense avg: LoRA 74.7 vs DoRA 78.4, DoRA paper), and raise r "
            "or targets if it lags."
        )
        scale = 16 / p.setup.r
        out.append(
            f"Risk, stability: at r={p.setup.r} with alpha=16 the update scale is {scale:g}; keep lr near 2e-4 "
            "and warmup 3%; use rsLoRA (alpha/sqrt(r)) if you go to r >= 64."
        )
    if sel.method == "qlora" or cheapest == "qlora":
        bf16 = p.params.total * 2
        out.append(
            f"Risk, compatibility: merging into the 4-bit base re-quantizes it (NF4 mean abs error "
            f"{NF4_MEAN_ABS_ERROR} per unit-variance weight); merge into a 16-bit copy ({_gib(bf16)}) instead."
        )
    if sel.training_cost is not None and sel.hours is not None:
        out.append(
            f"Risk, cost overrun / delay: at half the assumed MFU ({sel.mfu / 2:.2f}) training takes "
            f"{2 * sel.hours:,.2f} h and costs {_money(2 * sel.training_cost)} instead of "
            f"{_money(sel.training_cost)}."
        )
    if sel.roi is not None and p.benefit_per_month > 0:
        roi = sel.roi
        if roi.payback_months is None:
            out.append(
                f"Risk, never pays back: serving costs {_money(sel.serving_cost_per_month)}/month against a "
                f"benefit of {_money(p.benefit_per_month)}/month; share the base among adapters or cut serving."
            )
        else:
            out.append(
                f"ROI over {p.horizon_months:g} months: {roi.roi:+.1%} (cost {_money(roi.total_cost)} incl. "
                f"serving {_money(sel.serving_cost_per_month)}/month; payback {roi.payback_months:,.3g} months)."
            )
    if sel.method != "full" and p.adapters_per_base == 1:
        out.append(
            f"Serving: merged, the adapter costs the base model's {_money(sel.serving_cost_per_month)}/month; "
            f"{4} unmerged adapters sharing one base would pay {_money(sel.serving_cost_per_month / 4)}"
            "/month each (plus their small extra FLOPs)."
        )
    tpp = p.total_tokens / max(sel.trainable_params, 1)
    out.append(
        f"Risk, data quality / user satisfaction: {p.total_tokens:,.0f} training tokens = {tpp:,.3g} per "
        "trainable parameter; check the data first (lorakit data-check) and evaluate on real user tasks."
    )
    return out


def assumptions(p: Plan, mfu: float | None) -> list[str]:
    from lorakit.planner.cost import DEFAULT_MFU, METHOD_EFFICIENCY

    s: Setup = p.setup
    return [
        f"GPU {p.gpu.name}: {p.gpu.memory_gb} GiB, {p.gpu.peak_tflops} TFLOP/s dense bf16 peak, "
        f"${p.gpu.price_per_hour}/h, {p.gpu.overhead_gb} GiB framework overhead (GPU table; edit or pass your own).",
        f"MFU {mfu if mfu is not None else DEFAULT_MFU} ("
        + ("given" if mfu is not None else "assumed default")
        + "), times method efficiency "
        + ", ".join(f"{k} {v:.2f}" for k, v in METHOD_EFFICIENCY.items())
        + ".",
        f"Micro-batch {s.micro_batch} x {s.seq_len} tokens per GPU, {s.precision}, gradient checkpointing "
        f"{'on' if s.grad_checkpointing else 'off'}, {s.attention} attention, {s.optimizer}.",
        (
            "Multi-GPU: DDP, as lorakit train runs under torchrun: every GPU holds the whole model, its gradients "
            "and optimizer states, plus DDP's gradient buckets (a copy of the trainable gradients); more GPUs cut "
            "time, not memory per GPU (distributed='fsdp' shards it); communication time not modelled."
            if s.distributed == "ddp"
            else "Multi-GPU: FSDP2 as lorakit train runs it (fully_shard per decoder block, then the root): "
            "weights (NF4 storage included), gradients and optimizer states split across GPUs, plus the root's "
            "parameters and two blocks gathered in flight; activations are per GPU; communication time not modelled."
        ),
        "Data: every row padded or packed to seq_len when dataset_rows is given.",
        "Serving: bf16 weights + 20% KV-cache headroom per replica, always on "
        "(serving_hours_per_month, default 730); merged adapter = its own base copy.",
    ]
