"""``plan()``: can we afford this fine-tune, and how should we run it?

It turns a model (builtin, HF config directory, or a size like "7B"), a data size and a method into
memory per GPU, the GPUs that fit, training time and cost, serving cost, ROI and payback, and
recommendations tied to those numbers. Every method (full, LoRA, QLoRA, DoRA) is planned side by side
so the recommendation can name the cheapest one that fits. It plans only what ``lorakit train`` runs:
AdamW, and over several GPUs DDP (every GPU holds the whole model, so more GPUs cut time, not memory per
GPU) or FSDP (weights, gradients and optimizer states sharded, so a base too large for one GPU fits on
several); :func:`launch_command` is the ``torchrun`` line that runs the plan. The formulas and their sources are in :mod:`lorakit.planner.cost`; every default that is a guess is
listed in ``Plan.assumptions``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.planner.advice import RANKS, assumptions, recommendations
from lorakit.planner.arch import Arch, ParamCount, PlanError, count_params, resolve_arch
from lorakit.planner.cost import (
    ATTENTIONS,
    DEFAULT_MFU,
    DISTRIBUTED,
    GIB,
    METHOD_EFFICIENCY,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    Memory,
    Setup,
    flops_per_step_extra,
    flops_per_token,
    gather_bytes,
    gpus_needed,
    memory,
    train_hours,
)
from lorakit.planner.gpus import Gpu, get_gpu, load_gpus
from lorakit.planner.roi import Roi, serving_cost_per_month

MAX_GPUS = 64  # assumption: the largest job considered (8 nodes x 8 GPUs)
_NOTES = {
    "ddp": "under DDP every GPU holds the whole model; distributed='fsdp' shards it",
    "fsdp": "under FSDP weights, gradients and optimizer states are sharded; activations are not",
}
GPUS_PER_NODE = 8  # assumption: the node size a launch command spreads a larger job over
# The values each string parameter of plan() accepts; the command line offers them as its choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "precision": PRECISIONS,
    "attention": ATTENTIONS,
    "optimizer": tuple(OPTIMIZERS),
    "distributed": DISTRIBUTED,
    "task_complexity": tuple(RANKS),
}


@dataclass
class MethodPlan:
    """One method's numbers on the chosen GPU type."""

    method: str
    trainable_params: int
    trainable_pct: float
    checkpoint_bytes: (
        float  # what is saved: adapter tensors (or the whole model for full FT) at 2 bytes/param
    )
    gpus: int | None  # GPUs of the chosen type needed (None: does not fit on MAX_GPUS)
    memory: Memory | None  # per GPU, at ``gpus``
    single_gpu_memory: Memory  # on one GPU, whether it fits or not
    fits_on: dict[str, int | None]  # every GPU type in the table -> GPUs needed
    flops_per_token: float
    total_flops: float
    mfu: float
    hours: float | None
    training_cost: float | None
    serving_cost_per_month: float
    roi: Roi | None

    @property
    def fits(self) -> bool:
        return self.gpus is not None


@dataclass
class Plan:
    """The result of :func:`plan`. ``selected`` is the requested method; ``methods`` has all four."""

    model: str
    arch: Arch
    params: ParamCount
    gpu: Gpu
    setup: Setup
    tokens_per_epoch: int
    epochs: float
    total_tokens: float
    benefit_per_month: float
    horizon_months: float
    adapters_per_base: int
    methods: dict[str, MethodPlan]
    recommendations: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def selected(self) -> MethodPlan:
        return self.methods[self.setup.method]

    def as_dict(self) -> dict[str, Any]:
        def conv(obj: Any) -> Any:
            if isinstance(obj, Memory):
                return {**obj.as_gib(), "gpus": obj.gpus, "unit": "GiB"}
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                d = {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
                if isinstance(obj, MethodPlan):
                    d["fits"] = obj.fits
                if isinstance(obj, Roi):
                    d.update(
                        total_cost=obj.total_cost,
                        total_benefit=obj.total_benefit,
                        roi=obj.roi,
                        payback_months=obj.payback_months,
                    )
                return d
            if isinstance(obj, dict):
                return {k: conv(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [conv(v) for v in obj]
            return obj

        d = conv(self)
        d["selected"] = self.setup.method
        d["launch"] = launch_command(self)
        return d


def launch_command(p: Plan, config: str = "CONFIG.yaml") -> str:
    """The command that runs the selected method as planned: ``lorakit train`` on one GPU, ``torchrun``
    with ``training.distributed`` set on several (multi-node flags beyond :data:`GPUS_PER_NODE` GPUs)."""
    k = p.selected.gpus or 1
    if k == 1:
        return f"lorakit train {config}"
    nodes = -(-k // GPUS_PER_NODE)
    if nodes == 1:
        where = f"--nproc_per_node={k}"
    else:
        per = -(-k // nodes)
        where = f"--nnodes={nodes} --nproc_per_node={per} --node_rank=RANK --rdzv-endpoint=HOST:29500"
    return f"torchrun {where} -m lorakit train {config} --set training.distributed={p.setup.distributed}"


def _positive(name: str, value: Any, integer: bool = False) -> None:
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise PlanError(f"{name}={value!r} must be {kind}")


@dataclass(frozen=True)
class _Economics:
    """What every method's plan shares besides the architecture, the setup and the GPU."""

    total_tokens: float
    mfu: float | None
    benefit_per_month: float
    horizon_months: float
    adapters_per_base: int
    serving_hours_per_month: float


def plan(
    model: str | Arch,
    *,
    tokens: int | None = None,
    dataset_rows: int | None = None,
    seq_len: int = 512,
    epochs: float = 3,
    method: str = "lora",
    r: int = 8,
    targets: str | tuple[str, ...] | list[str] | None = None,
    gpu: str | Gpu = "A100-80GB",
    gpus: int | None = None,
    gpu_table: str | dict[str, Gpu] | None = None,
    price_per_hour: float | None = None,
    mfu: float | None = None,
    benefit_per_month: float = 0.0,
    horizon_months: float = 12.0,
    micro_batch: int = 4,
    precision: str = "bf16-mixed",
    grad_checkpointing: bool = True,
    attention: str = "sdpa",
    optimizer: str = "adamw",
    distributed: str = "ddp",
    adapters_per_base: int = 1,
    serving_hours_per_month: float = 730.0,
    task: str | None = None,
    task_complexity: str = "moderate",
) -> Plan:
    """Plan a fine-tune: every method side by side on the chosen GPU, the requested one selected.

    Data size: ``tokens`` per epoch, or ``dataset_rows`` x ``seq_len`` (each row padded or packed to
    ``seq_len``). Defaults follow the source note's recipe (rank, q/v targets, micro-batch, epochs, mixed
    precision, gradient checkpointing); ``mfu`` None is the assumed :data:`lorakit.planner.cost.DEFAULT_MFU`.
    The command line (``lorakit plan``) takes its flags, defaults, choices (:data:`CHOICES`) and help from
    this signature and the list below.

    Args:
        model: a builtin name, a local Hugging Face model directory, a size such as "7B"
            (:mod:`lorakit.planner.ref_sizes`), or an :class:`Arch`.
        tokens: training tokens per epoch.
        dataset_rows: rows per epoch, each ``seq_len`` tokens.
        seq_len: tokens per row / sequence.
        epochs: passes over the data.
        method: the method to plan; the others are planned beside it for comparison.
        r: adapter rank.
        targets: module names (a list; comma-separated on the command line), 'all-linear' or a regex
            (default: query/value).
        gpu: GPU name from the table.
        gpus: GPUs to use (default: the fewest that fit).
        gpu_table: your own GPU table (JSON, same layout as the default).
        price_per_hour: override the GPU's hourly price (USD).
        mfu: model FLOPs utilisation in (0, 1].
        benefit_per_month: expected benefit in USD per month.
        horizon_months: ROI horizon.
        micro_batch: sequences per GPU per step.
        precision: training precision.
        grad_checkpointing: recompute each block's activations in the backward instead of keeping them.
        attention: attention kernel: sdpa keeps no s x s matrix (memory-efficient / Flash), eager does.
        optimizer: what lorakit train runs: AdamW.
        distributed: how ``gpus`` > 1 train (``training.distributed``): ddp (every GPU holds the whole
            model, so memory per GPU does not shrink) or fsdp (FSDP2: weights, gradients and optimizer
            states sharded across the GPUs, so a model too large for one GPU fits on several).
        adapters_per_base: unmerged adapters sharing one served base, 1 meaning merged.
        serving_hours_per_month: hours a month the served model runs.
        task: "causal-lm", "classification" or "base" (default: the model's own).
        task_complexity: how hard the task is; it sets the rank range and targets recommended.

    Raises:
        PlanError: bad input, an unknown GPU (listing the known ones) or a method that fits on no GPU of
            the table.
    """
    table, chosen = _gpu_choice(gpu, gpu_table, price_per_hour)
    per_epoch = _tokens_per_epoch(tokens, dataset_rows, seq_len)
    _check_numbers(epochs, horizon_months, gpus, mfu, benefit_per_month)
    levels = CHOICES["task_complexity"]
    if task_complexity not in levels:
        expected = ", ".join(map(repr, levels[:-1])) + f" or {levels[-1]!r}"
        raise PlanError(f"task_complexity={task_complexity!r}; expected {expected}")
    if method not in METHODS:
        raise PlanError(f"method={method!r} is not supported; expected one of {list(METHODS)}")
    arch = resolve_arch(model, task=task)
    pc = count_params(arch)
    base = Setup(
        method=method,
        r=r,
        targets=tuple(targets) if isinstance(targets, list) else targets,
        seq_len=int(seq_len),
        micro_batch=micro_batch,
        precision=precision,
        grad_checkpointing=grad_checkpointing,
        attention=attention,
        optimizer=optimizer,
        distributed=distributed,
    )
    econ = _Economics(
        per_epoch * float(epochs), mfu, benefit_per_month, horizon_months, adapters_per_base,
        serving_hours_per_month,
    )
    methods = {  # every method side by side; only the selected one is held to ``gpus``
        m: _method_plan(
            arch, pc, dataclasses.replace(base, method=m), chosen, table, gpus if m == method else None, econ
        )
        for m in METHODS
    }
    _check_fits(methods[method], arch, base, chosen, gpus)
    p = Plan(
        model=str(model if isinstance(model, str) else arch.name),
        arch=arch,
        params=pc,
        gpu=chosen,
        setup=base,
        tokens_per_epoch=per_epoch,
        epochs=float(epochs),
        total_tokens=econ.total_tokens,
        benefit_per_month=float(benefit_per_month),
        horizon_months=float(horizon_months),
        adapters_per_base=adapters_per_base,
        methods=methods,
    )
    p.recommendations = recommendations(p, table, task_complexity)
    p.assumptions = assumptions(p, mfu)
    return p


def _gpu_choice(
    gpu: str | Gpu, gpu_table: str | dict[str, Gpu] | None, price_per_hour: float | None
) -> tuple[dict[str, Gpu], Gpu]:
    """(the GPU table, the chosen GPU with its price overridden when one is given)."""
    table = gpu_table if isinstance(gpu_table, dict) else load_gpus(gpu_table)
    chosen = get_gpu(gpu, table)
    if price_per_hour is not None:
        if not (math.isfinite(price_per_hour) and price_per_hour >= 0):
            raise PlanError(f"price_per_hour={price_per_hour!r} must be a number >= 0")
        chosen = dataclasses.replace(chosen, price_per_hour=float(price_per_hour))
    return table, chosen


def _tokens_per_epoch(tokens: int | None, dataset_rows: int | None, seq_len: int) -> int:
    """The data size: ``tokens``, or ``dataset_rows`` rows of ``seq_len`` tokens (exactly one is given)."""
    if (tokens is None) == (dataset_rows is None):
        raise PlanError(
            "give exactly one data size: --tokens N (tokens per epoch; tokens= in the API) or --dataset-rows R "
            "(rows per epoch, each --seq-len tokens; dataset_rows= in the API)"
        )
    _positive("seq_len", seq_len, integer=True)
    if tokens is not None:
        _positive("tokens", tokens, integer=True)
        return int(tokens)
    _positive("dataset_rows", dataset_rows, integer=True)
    return int(dataset_rows) * int(seq_len)


def _check_numbers(
    epochs: float, horizon_months: float, gpus: int | None, mfu: float | None, benefit_per_month: float
) -> None:
    _positive("epochs", epochs)
    _positive("horizon_months", horizon_months)
    if gpus is not None:
        _positive("gpus", gpus, integer=True)
    if mfu is not None and not (isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise PlanError(f"mfu={mfu!r} must be in (0, 1]")
    if not (
        isinstance(benefit_per_month, (int, float))
        and math.isfinite(benefit_per_month)
        and benefit_per_month >= 0
    ):
        raise PlanError(f"benefit_per_month={benefit_per_month!r} must be a number >= 0")


def _check_fits(sel: MethodPlan, arch: Arch, setup: Setup, gpu: Gpu, gpus: int | None) -> None:
    """Refuse a plan whose selected method fits no GPU of the table, or not the ``gpus`` asked for."""
    if not any(sel.fits_on.values()):
        need = sel.single_gpu_memory.activations + sel.single_gpu_memory.transient
        raise PlanError(
            f"method={setup.method!r} on {arch.name} fits on no GPU in the table ({_NOTES[setup.distributed]}): one GPU "
            f"needs {sel.single_gpu_memory.total / GIB:,.1f} GiB, {need / GIB:,.1f} GiB of it activations "
            f"(seq_len {setup.seq_len} x micro_batch {setup.micro_batch}); try qlora, gradient checkpointing "
            "or a smaller micro-batch/sequence"
        )
    if sel.gpus is None:
        first = sel.fits_on.get(gpu.name)
        per_gpu = memory(arch, setup, gpu, gpus or 1).total / GIB
        where = ", ".join(f"{k} x{v}" for k, v in sel.fits_on.items() if v)
        raise PlanError(
            f"method={setup.method!r} on {arch.name} does not fit {gpus or 1} x {gpu.name} "
            f"({per_gpu:,.1f} GiB per GPU of {gpu.memory_gb} GiB; {_NOTES[setup.distributed]})"
            + (f"; it needs {first} of them" if first else "")
            + f"; it fits on: {where}"
        )


def _method_plan(
    arch: Arch,
    pc: ParamCount,
    setup: Setup,
    gpu: Gpu,
    table: dict[str, Gpu],
    gpus: int | None,
    econ: _Economics,
) -> MethodPlan:
    """One method's memory, GPUs, FLOPs, time, cost and ROI; ``gpus`` None: the fewest that fit."""
    from lorakit.planner.cost import trainable_params

    mem1, gather = memory(arch, setup, None, 1), gather_bytes(arch, setup)
    fits_on = {name: gpus_needed(mem1, g, setup, MAX_GPUS, gather) for name, g in table.items()}
    if gpu.name not in fits_on:
        fits_on[gpu.name] = gpus_needed(mem1, gpu, setup, MAX_GPUS, gather)
    cap = gpu.memory_gb * GIB
    if gpus is None:
        k = fits_on[gpu.name]
    else:
        k = gpus if memory(arch, setup, gpu, gpus).total <= cap else None
    n = trainable_params(arch, setup)
    fpt = flops_per_token(arch, setup)
    tokens = econ.total_tokens
    total_flops = fpt * tokens + flops_per_step_extra(arch, setup) * tokens / setup.tokens_per_step
    eff_mfu = (econ.mfu if econ.mfu is not None else DEFAULT_MFU) * METHOD_EFFICIENCY[setup.method]
    serving = serving_cost_per_month(arch, setup, gpu, econ.adapters_per_base, econ.serving_hours_per_month)
    hours = cost = roi = None
    if k is not None:
        hours = train_hours(total_flops, gpu, k, eff_mfu)
        cost = hours * k * gpu.price_per_hour
        roi = Roi(cost, serving, econ.benefit_per_month, econ.horizon_months)
    return MethodPlan(
        method=setup.method,
        trainable_params=n,
        trainable_pct=100.0 * n / pc.total,
        checkpoint_bytes=2.0 * n,
        gpus=k,
        memory=memory(arch, setup, gpu, k) if k else None,
        single_gpu_memory=memory(arch, setup, gpu, 1),
        fits_on=fits_on,
        flops_per_token=fpt,
        total_flops=total_flops,
        mfu=eff_mfu,
        hours=hours,
        training_cost=cost,
        serving_cost_per_month=serving,
        roi=roi,
    )
