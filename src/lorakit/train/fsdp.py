"""FSDP2 sharded training: the frozen base (NF4 storage included) and the adapters split across ranks.

``training.distributed: fsdp`` under ``torchrun`` wraps each decoder block
(``lorakit.models.families.decoder_blocks``) and then the whole model with PyTorch's FSDP2
``torch.distributed.fsdp.fully_shard``: every parameter -- frozen base weights, NF4 packed codes and scales
(re-registered as frozen parameters by ``NF4Linear.storage_as_parameters``), adapter tensors -- is kept as a
dim-0 shard (a ``DTensor``) of 1/world_size per rank, all-gathered one block at a time for forward and
backward and freed after; adapter gradients are reduce-scattered (averaged, as DDP does). Per-rank memory of
the base therefore falls with the number of ranks. On CUDA with bf16 the ``MixedPrecisionPolicy`` computes in
bf16 and reduces gradients in fp32, the adapter masters stay fp32 (non-float NF4 codes are never cast).

What crosses the shard boundary is gathered with PyTorch's own tools, collectively on every rank:
:func:`full_trainable_state` (``DTensor.full_tensor``) for checkpoints, :func:`gathered_adapters` (full
adapter tensors swapped in while rank 0 writes the PEFT file, so the file is never a shard), and
``torch.distributed.checkpoint.state_dict`` ``get/set_optimizer_state_dict`` with ``full_state_dict`` for
the optimizer, saved keyed by parameter name and re-sharded on load, so a resumed run continues bit for bit
under the same world size.

AdaLoRA: its rank allocator (``lorakit.adapters.adalora_budget``) scores every entry of the full E/A/B
tensors from their gradients and masks whole entries of E between steps, and its orthogonal penalty reads
P and Q outside the model's forward -- none of which a dim-0 shard can do alone. So for AdaLoRA
(``REPLICATED_METHODS``) only the frozen base is sharded: every trainable parameter is passed to
``fully_shard`` as ``ignored_params`` and stays a plain, whole tensor on every rank (as under DDP; the
adapter is a few MiB, the base is what does not fit). FSDP does not reduce the gradients of ignored
parameters, so :func:`average_replicated_grads` all-reduces them after the last micro-batch and divides by
the world size (DDP's mean, what the reduce-scatter of the sharded methods computes). Every rank then holds
the same gradients, takes the same optimizer step and runs the same budget step on the same scores: the
rank allocation is computed identically everywhere, with no gather and no write-back of shards. (Gathering
sharded tensors for each budget step and scattering the masked E back would be exact too, but needs a
collective per step and DTensor-aware masking, compaction and penalty code.)

One process: FSDP needs two or more, and one is refused -- except under torchrun with
``LORAKIT_FSDP_ONE_PROCESS=1`` (``lorakit.train.distributed.one_process_fsdp``), which the one-GPU smoke run
of ``benchmarks/fsdp_smoke.py`` sets: the same wrapping on a one-device mesh (nothing is split; what it
checks is that the sharded code path -- NF4 storage as parameters, bf16 mixed precision, gathered saves --
runs on CUDA). Two processes on one GPU are not an option: NCCL refuses two ranks on one device.

Limits: the model is built whole on each rank before it is sharded (host memory holds one full copy per
rank while it loads); full fine-tuning is refused here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.config import ConfigError
from lorakit.train.distributed import Dist, one_process_fsdp

MODES = ("none", "ddp", "fsdp")
# methods whose trainable tensors stay whole (replicated) on every rank: only the frozen base is sharded
REPLICATED_METHODS = ("adalora",)


def resolve_mode(requested: str | None, d: Dist) -> str:
    """The data-parallel mode of this run: ``training.distributed`` checked against the process count
    (None: ddp under several processes, none for one). Raises ``ConfigError`` before any work."""
    if requested is None:
        return "ddp" if d.enabled else "none"
    if requested == "fsdp" and not d.enabled and not one_process_fsdp():
        raise ConfigError(
            "training.distributed='fsdp' shards the model across processes but this is one process; start it "
            "with torchrun --nproc_per_node=N -m lorakit train ... (N >= 2)"
        )
    if requested == "none" and d.enabled:
        raise ConfigError(
            f"training.distributed='none' but torchrun started {d.world_size} processes; use ddp or fsdp, "
            "or run one process"
        )
    return requested


def check_model(model: nn.Module, adapter_method: str | None) -> list[nn.Module]:
    """The decoder blocks FSDP wraps one by one; ``ConfigError`` when lorakit cannot find them, or for a
    method the sharded trainer cannot run."""
    from lorakit.models.families import decoder_blocks

    if adapter_method == "full":
        raise ConfigError(
            "training.distributed='fsdp' does not run adapter.method='full' (full fine-tuning is not sharded "
            "by lorakit); use an adapter method (lora, dora, adalora), or distributed: ddp"
        )
    try:
        blocks = decoder_blocks(model)
    except (ValueError, KeyError) as e:
        raise ConfigError(
            f"training.distributed='fsdp': cannot find the decoder blocks of {type(model).__name__} ({e}); "
            "use distributed: ddp"
        ) from None
    if not blocks:
        raise ConfigError(f"training.distributed='fsdp': {type(model).__name__} has no decoder blocks to shard")
    return blocks


def check_rows(n_rows: int, d: Dist, path: str) -> None:
    """Every rank needs rows of its own: refuse fewer training rows than processes, before any work."""
    if n_rows < d.world_size:
        raise ValueError(
            f"{path}: {n_rows} training rows for {d.world_size} processes; each process needs at least one row"
        )


def prepare(model: nn.Module, adapter_method: str | None, d: Dist, precision_name: str) -> list[nn.Parameter]:
    """Shard the run's model (built on the CPU: see :func:`build_device`) onto ``d.device``: the blocks
    found and checked, bf16 compute on GPU under bf16 precision, AdaLoRA's adapter replicated. Returns the
    replicated parameters (their gradients: :func:`average_replicated_grads`)."""
    blocks = check_model(model, adapter_method or "full")
    bf16 = precision_name == "bf16" and d.device.type == "cuda"
    return shard(model, blocks, d, bf16, replicate_trainable=adapter_method in REPLICATED_METHODS)


def build_device(mode: str, d: Dist) -> torch.device:
    """Where the run's model is built and left before sharding: the CPU under FSDP (``fully_shard`` moves
    each block to the device as it shards it, so no device ever holds the whole model), else the device."""
    return torch.device("cpu") if mode == "fsdp" else d.device


def shard(
    model: nn.Module, blocks: list[nn.Module], d: Dist, bf16: bool, replicate_trainable: bool = False
) -> list[nn.Parameter]:
    """``fully_shard`` each block, then the root (embeddings, final norm, head): ``model`` then holds
    DTensor shards on ``d.device``. ``bf16``: bf16 compute, fp32 gradient reduction (GPU).

    ``replicate_trainable`` (AdaLoRA): every trainable parameter is left out of the sharding, whole on every
    rank and made equal to rank 0's; returns those parameters (empty otherwise), whose gradients the caller
    averages with :func:`average_replicated_grads` after each backward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lorakit.quant.linear import NF4Linear

    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.storage_as_parameters()
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    replicated = [p for p in model.parameters() if p.requires_grad] if replicate_trainable else []
    if replicated:
        kw["ignored_params"] = set(replicated)
        with torch.no_grad():
            for p in replicated:  # FSDP moves only what it manages; the broadcast needs the device (nccl)
                p.data = p.data.to(d.device)
        if d.enabled:
            _broadcast_from_rank0(replicated, d)
    for block in blocks:
        fully_shard(block, **kw)  # moves the block's parameters and buffers to the device, then shards
    # the root (embeddings, head) too is freed after forward, not kept gathered until backward as FSDP2's
    # default for the root does: an evaluation (no backward) would leave it whole on every rank
    fully_shard(model, reshard_after_forward=True, **kw)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):  # anything FSDP left where it was built
            if not _is_dtensor(t) and t.device != d.device:
                t.data = t.data.to(d.device)
    return replicated


def _broadcast_from_rank0(params: list[nn.Parameter], d: Dist) -> None:
    """Rank 0's values on every rank (DDP does the same at wrap time), in one collective."""
    import torch.distributed as dist

    dtype = _common_dtype(params)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in params])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, [p.data for p in params])


def _common_dtype(params: list[nn.Parameter]) -> torch.dtype:
    """One dtype that holds every value of ``params`` exactly (fp32 at least), for a flat buffer."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _unflatten_into(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    start = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[start : start + n].view_as(t))
        start += n


def average_replicated_grads(params: list[nn.Parameter], d: Dist) -> None:
    """The gradients of the replicated (unsharded) parameters averaged over ranks in one all-reduce, as
    DDP does: call after the last micro-batch's backward, before clipping and the optimizer step. A
    gradient missing on every rank stays None; one missing on some ranks counts as zero there."""
    import torch.distributed as dist

    if not params or not d.enabled:
        return
    dev, dtype = params[0].device, _common_dtype(params)
    parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=dev)
             for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=dev)
    flat = torch.cat([*parts, present])
    dist.all_reduce(flat)
    grads, has = flat[: -len(params)] / d.world_size, flat[-len(params) :]
    start = 0
    for p, h in zip(params, has.tolist()):
        n = p.numel()
        if h > 0:
            g = grads[start : start + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        start += n


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``lorakit.train.checkpoint.trainable_state`` of a sharded model: the same names, full tensors on the
    CPU of every rank. Collective: every rank calls it."""
    from lorakit.train.checkpoint import trainable_names

    names = trainable_names(model)
    out = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if n in names:
            t = t.detach()
            out[n] = (t.full_tensor() if _is_dtensor(t) else t).cpu().clone()
    return out


@contextlib.contextmanager
def gathered_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every trainable parameter is its full (gathered) tensor, so code that reads the model --
    ``lorakit.io.save_adapter`` -- sees the whole adapter, never a shard; the shards are put back after.
    Collective on entry: every rank enters."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and _is_dtensor(p):
                    full = p.detach().full_tensor()
                    module._parameters[name] = nn.Parameter(full, requires_grad=True)
                    swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


class ShardedOptimizerState:
    """The optimizer's state under FSDP in and out of a checkpoint: full tensors keyed by parameter name
    (``get_optimizer_state_dict`` with ``full_state_dict``), re-sharded on load. Both are collective."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
        sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return _to_cpu(sd)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=sd, options=opts)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


MEMORY_KINDS = ("parameters", "gradients", "optimizer", "held")


def _local_bytes(tensors: Iterator[Any]) -> int:
    """Storage bytes of ``tensors`` on this rank (a DTensor by its local shard), each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if _is_dtensor(t) else t
        st = local.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's tensor bytes by kind, taken after an optimizer step and before ``zero_grad`` (the
    model at rest: gathered blocks freed, gradients and optimizer state present): ``parameters`` (local
    shards, replicated tensors whole, frozen ones included), ``gradients``, ``optimizer`` (AdamW's m and v
    and step counters) and ``held``, every tensor the process holds (``lorakit.bench.memory``). What
    ``lorakit plan --calibrate --distributed fsdp`` compares with the planner's per-rank terms."""
    import gc

    from lorakit.bench.memory import held_tensor_bytes

    gc.collect()  # what is still referenced, not garbage awaiting collection
    params = list(model.parameters())
    state = (v for s in optimizer.state.values() for v in s.values())
    return {
        "parameters": _local_bytes(iter(params)),
        "gradients": _local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": _local_bytes(state),
        "held": held_tensor_bytes(),
    }


def gather_rank_memory(mine: dict[str, int] | None, d: Dist) -> list[dict[str, int]]:
    """Every rank's :func:`rank_memory` (rank order), on every rank; collective. ``mine`` None (no step
    taken) counts as zeros."""
    from lorakit.train.distributed import all_sum

    values = [0.0] * (len(MEMORY_KINDS) * d.world_size)
    for i, kind in enumerate(MEMORY_KINDS):
        values[d.rank * len(MEMORY_KINDS) + i] = float((mine or {}).get(kind, 0))
    total = all_sum(values, d)
    n = len(MEMORY_KINDS)
    return [{k: int(total[r * n + i]) for i, k in enumerate(MEMORY_KINDS)} for r in range(d.world_size)]
