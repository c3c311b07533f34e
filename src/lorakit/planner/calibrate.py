"""Calibrate the planner on this machine: predicted vs measured peak memory and step time.

What is measured (the builtin ``llama-15m``, lorakit's own LoRA r=8 on q/v, AdamW, fp32 on CPU,
batch 8 x 256 random tokens, the attention implementation transformers picked):
- the machine's matmul rate (FLOP/s) on the model's own GEMM shapes — the "peak" of the time formula,
  so the prediction is FLOPs / rate with MFU = 1;
- step time (median of ``steps`` timed steps after one warm-up step), each compared with the rate
  measured just before and after it, in wall-clock time and in process CPU time;
- peak tensor memory of one step from ``torch.profiler``'s memory timeline (the CPU counterpart of
  ``torch.cuda.max_memory_allocated``), and, for information, the process's peak RSS growth, which
  also holds the allocator's cache and the BLAS/oneDNN workspaces that the GPU table's "overhead" covers.
The predictions come from the same functions :func:`lorakit.planner.plan.plan` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from lorakit.bench.memory import current_rss_mib, peak_rss_mib
from lorakit.planner.arch import resolve_arch
from lorakit.planner.cost import Setup, flops_per_token, memory


@dataclass
class Calibration:
    model: str
    batch: int
    seq_len: int
    attention: str
    threads: int
    matmul_gflops: float
    flops_per_step: float
    predicted_step_s: float
    measured_step_s: float
    predicted_peak_mb: float
    measured_peak_mb: float  # tensor memory, torch.profiler memory timeline
    measured_rss_growth_mb: float  # process peak RSS growth since before the model was built
    time_ratio: float  # median over steps of predicted / measured wall time
    cpu_time_ratio: float  # the same on process CPU time (insensitive to other jobs on the machine)
    measured_step_cpu_s: float

    @property
    def memory_ratio(self) -> float:
        return self.predicted_peak_mb / self.measured_peak_mb

    def table(self) -> str:
        return "\n".join(
            [
                f"calibration: {self.model}, LoRA r=8 on q/v, AdamW, fp32, batch {self.batch} x {self.seq_len}, "
                f"{self.attention} attention, {self.threads} CPU threads",
                f"machine matmul rate: {self.matmul_gflops:,.1f} GFLOP/s; FLOPs per step {self.flops_per_step:,.4g}",
                f"{'':<22}{'predicted':>12}{'measured':>12}{'ratio':>8}",
                f"{'step time (s)':<22}{self.predicted_step_s:>12.3f}{self.measured_step_s:>12.3f}{self.time_ratio:>8.2f}",
                f"{'peak memory (MB)':<22}{self.predicted_peak_mb:>12.1f}{self.measured_peak_mb:>12.1f}"
                f"{self.memory_ratio:>8.2f}",
                f"{'step CPU time ratio':<22}{'':>12}{self.measured_step_cpu_s:>12.3f}{self.cpu_time_ratio:>8.2f}",
                f"(process peak RSS growth, incl. allocator cache and BLAS workspaces: {self.measured_rss_growth_mb:,.1f} MB)",
            ]
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "memory_ratio": self.memory_ratio}


def matmul_rate(shapes: list[tuple[int, int, int]], reps: int = 10) -> tuple[float, float]:
    """FLOP/s of fp32 ``(m x k) @ (k x n)`` products over ``shapes`` (2mkn FLOPs each), per wall-clock
    second and per second of process CPU time (summed over threads)."""
    flops, wall, cpu = 0.0, 0.0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(n, k)
        a @ b.t()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b.t()
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        flops += 2 * m * k * n * reps
    return flops / wall, flops / max(cpu, 1e-9)


def _rss_mb() -> float:
    return current_rss_mib() * 2**20 / 1e6


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side prints "profiler_start/stop" lines there,
    which Python's sys.stderr cannot catch); restored on exit, errors included."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak_mb(step) -> float:
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced():
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            step()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        # torch deprecates the CPU memory timeline in favour of CUDA-only tools; it is the CPU one we need
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*export_memory_timeline")
        path = os.path.join(d, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _times, sizes = json.load(f)
    return max(sum(s) for s in sizes) / 1e6


def calibrate(
    model: str = "llama-15m",
    batch: int = 8,
    seq_len: int = 256,
    steps: int = 3,
    seed: int = 0,
    threads: int | None = 1,
) -> Calibration:
    """Measure and predict one LoRA training step of ``model`` on this CPU (see the module docstring).

    ``threads`` (default 1; None keeps torch's setting): with one thread, other jobs on a shared machine
    slow the matmul probe and the step alike; with several, a descheduled thread stalls the others at
    every op's barrier, which penalises the many small ops of a step far more than one large GEMM."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _calibrate(model, batch, seq_len, steps, seed)
    finally:
        torch.set_num_threads(previous)


def _calibrate(model: str, batch: int, seq_len: int, steps: int, seed: int) -> Calibration:
    from lorakit.config import AdapterConfig
    from lorakit.models import build_model
    from lorakit.surgery.inject import inject

    torch.manual_seed(seed)
    arch = resolve_arch(model)
    tokens = batch * seq_len
    shapes = [
        (tokens, arch.hidden, arch.intermediate),
        (tokens, arch.intermediate, arch.hidden),
        (tokens, arch.hidden, arch.q_dim),
    ]
    rss0 = _rss_mb()
    net = build_model(model)
    attention = "sdpa" if getattr(net.config, "_attn_implementation", "eager") == "sdpa" else "eager"
    inject(net, AdapterConfig(r=8, alpha=16, target_modules=None))
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, arch.vocab, (batch, seq_len))

    def step() -> None:
        out = net(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer states, thread pools
    setup = Setup(
        method="lora",
        r=8,
        targets=None,
        seq_len=seq_len,
        micro_batch=batch,
        precision="fp32",
        grad_checkpointing=False,
        attention=attention,
        loss="full",  # the step above uses the model's own loss (full logits)
    )
    fps = flops_per_token(arch, setup) * tokens
    # the rate is measured right before and after every timed step (wall clock and process CPU time), so a
    # machine shared with other jobs slows both sides of the ratio alike
    walls, cpus, wall_ratios, cpu_ratios, rates = [], [], [], [], []
    for _ in range(steps):
        before = matmul_rate(shapes, reps=3)
        t, c = time.perf_counter(), time.process_time()
        step()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        after = matmul_rate(shapes, reps=3)
        rate, cpu_rate = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        walls.append(wall)
        cpus.append(cpu)
        rates.append(rate)
        wall_ratios.append(fps / rate / wall)
        cpu_ratios.append(fps / cpu_rate / cpu)
    rss_growth = peak_rss_mib() * 2**20 / 1e6 - rss0
    peak = _profiled_peak_mb(step)
    return Calibration(
        model=model,
        batch=batch,
        seq_len=seq_len,
        attention=attention,
        threads=torch.get_num_threads(),
        matmul_gflops=statistics.median(rates) / 1e9,
        flops_per_step=fps,
        predicted_step_s=fps / statistics.median(rates),
        measured_step_s=statistics.median(walls),
        time_ratio=statistics.median(wall_ratios),
        cpu_time_ratio=statistics.median(cpu_ratios),
        measured_step_cpu_s=statistics.median(cpus),
        predicted_peak_mb=memory(arch, setup).total / 1e6,
        measured_peak_mb=peak,
        measured_rss_growth_mb=rss_growth,
    )
