"""Multi-process training under ``torchrun``: the process group, and data parallelism over the adapters.

``torchrun --nproc_per_node=N -m lorakit train CONFIG.yaml`` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK set; each joins a process group (gloo on CPU, nccl on CUDA) and trains on a disjoint slice of
every global batch. ``training.distributed`` picks how the model is split:

- ``ddp`` (the default under several processes): every process holds the whole model and
  DistributedDataParallel all-reduces the trainable gradients (frozen base weights have no gradients, so
  only adapter tensors travel);
- ``fsdp``: the base (NF4 storage included) and the adapters are sharded across processes with PyTorch's
  FSDP2, per decoder block (``lorakit.train.fsdp``), so per-process memory of the base falls with N;
- ``none``: one process.

Only rank 0 writes files. A collective that fails because a peer died raises ``PeerLostError`` (one
line, naming the last checkpoint) instead of a backend traceback.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() joined the process group, so teardown() leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(spec)


ONE_PROCESS_FSDP = "LORAKIT_FSDP_ONE_PROCESS"


def one_process_fsdp() -> bool:
    """``LORAKIT_FSDP_ONE_PROCESS=1`` under torchrun: FSDP on a single process (a one-device mesh), for the
    one-GPU smoke run of ``benchmarks/fsdp_smoke.py`` only; nothing is sharded, nothing else allows it."""
    return os.environ.get(ONE_PROCESS_FSDP) == "1" and "WORLD_SIZE" in os.environ


def setup(device_spec: str = "auto", timeout_s: float | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, or one process with
    :func:`one_process_fsdp`); a no-op otherwise. ``timeout_s``: how long any collective waits for the
    other processes before it fails (a hung peer ends the job; None: PyTorch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local)
    owns = (world > 1 or one_process_fsdp()) and not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=backend, **kw)
    return Dist(rank, world, local, device, owns)


class PeerLostError(RuntimeError):
    """A collective with the other processes failed: one of them stopped (killed, crashed) or hangs."""


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes run (it all-reduces the trainable
    gradients in backward); ``module`` itself for one process."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def is_peer_failure(e: BaseException) -> bool:
    """True for the errors a collective raises when a peer process died or timed out (gloo / NCCL)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "Connection reset", "Connection closed", "NCCL", "Timed out")
    )


def teardown(d: Dist) -> None:
    """Leave the process group if :func:`setup` joined it (a caller's own group stays for its next run)."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few float64 scalars over ranks (identity in one process)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        t = t.to(d.device if d.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
    return t.cpu()


def max_rank_difference(params: list[torch.Tensor], d: Dist) -> float:
    """Largest |difference| between any rank's trainable tensors and rank 0's (0.0 in one process):
    a check that DDP kept the replicas identical."""
    if not d.enabled or not params:
        return 0.0
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    ref = flat.clone()
    dev = d.device if d.device.type == "cuda" else torch.device("cpu")
    ref = ref.to(dev)
    dist.broadcast(ref, src=0)
    diff = (flat.to(dev) - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, d: Dist) -> bool:
    """True on every rank if it is True on any rank."""
    return bool(all_sum([1.0 if flag else 0.0], d)[0] > 0)
