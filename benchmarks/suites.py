"""Benchmark suites: model, batch and repetition settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Suite:
    model: str  # a lorakit builtin
    batch: int
    seq: int
    threads: int
    warmup: int  # untimed training steps
    steps: int  # timed training steps per process
    rounds: int  # interleaved rounds (each case/side runs once per round, in its own process)
    infer_repeats: int
    dtype: torch.dtype | None = None  # base weights (None: fp32)
    compute_dtype: torch.dtype = torch.float32  # NF4 dequantization dtype
    device: str = "cpu"


SUITES = {
    # The reference setting: llama-15m (hidden 512, 4 layers, 8 heads, vocab 2000), 8 x 256 tokens, 2 threads.
    "cpu-small": Suite("llama-15m", 8, 256, 2, warmup=2, steps=4, rounds=2, infer_repeats=5),
    # Issue 16 items 4 and 5 (benchmarks/bench_speed.py): cpu-small with NF4 dequantized to bf16 for the matmul.
    "cpu-speed": Suite("llama-15m", 8, 256, 2, warmup=2, steps=4, rounds=3, infer_repeats=20,
                       compute_dtype=torch.bfloat16),
    # A quick smoke run of the whole harness (used by the tests).
    "smoke": Suite("tiny-llama", 2, 32, 1, warmup=1, steps=2, rounds=1, infer_repeats=2),
    # For a machine with an accelerator: same shape of report, bf16 base.
    "gpu": Suite("llama-15m", 16, 512, 8, warmup=3, steps=10, rounds=2, infer_repeats=10,
                 dtype=torch.bfloat16, compute_dtype=torch.bfloat16, device="cuda"),
}
