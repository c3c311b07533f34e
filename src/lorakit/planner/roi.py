"""Serving cost and ROI of a fine-tune.

- Serving: a merged adapter (or a full fine-tune) needs its own copy of the base model, so it costs
  what the base costs to serve; M unmerged adapters on one base share it (S-LoRA, Punica), each paying
  1/M plus the adapters' extra FLOPs.
- ROI over the horizon = (benefit - cost) / cost, cost = training + serving over the horizon;
  payback = training cost / (monthly benefit - monthly serving cost). The source note's version
  (payback = cost / annual benefit x 12) leaves serving out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.planner.arch import Arch, PlanError, count_params
from lorakit.planner.cost import GIB, Setup, adapted_matrices
from lorakit.planner.gpus import Gpu


def serving_gpus(arch: Arch, gpu: Gpu, kv_headroom: float = 0.2) -> int:
    """GPUs holding the bf16 model for inference, with ``kv_headroom`` extra for the KV cache (assumption)."""
    need = count_params(arch).total * 2 * (1 + kv_headroom) + gpu.overhead_gb * GIB
    return max(1, math.ceil(need / (gpu.memory_gb * GIB)))


def serving_cost_per_month(
    arch: Arch, setup: Setup, gpu: Gpu, adapters_per_base: int = 1, hours_per_month: float = 730.0
) -> float:
    """Monthly serving cost of this fine-tune. A merged adapter (or a full fine-tune) needs its own copy
    of the base: the base model's cost. ``adapters_per_base`` > 1 unmerged adapters share one base: each
    pays 1/M of it, plus the unmerged adapters' extra FLOPs (2 N_adapter per token on top of 2 N)."""
    if adapters_per_base < 1:
        raise PlanError(f"adapters_per_base={adapters_per_base!r} must be >= 1")
    if hours_per_month < 0:
        raise PlanError(f"serving_hours_per_month={hours_per_month!r} must be >= 0")
    base = serving_gpus(arch, gpu) * gpu.price_per_hour * hours_per_month
    if setup.method == "full" or adapters_per_base == 1:
        return base
    n_ad = sum(r * (m.d_in + m.d_out) for m, r in adapted_matrices(arch, setup))
    n_mm = count_params(arch).matmul
    return base * (1 + n_ad / n_mm) / adapters_per_base


@dataclass(frozen=True)
class Roi:
    """ROI over a horizon: (benefit - cost) / cost, where cost = training + serving over the horizon.
    Payback = training cost / (monthly benefit - monthly serving cost); None if it never pays back."""

    training_cost: float
    serving_cost_per_month: float
    benefit_per_month: float
    horizon_months: float
    total_cost: float = field(init=False)
    total_benefit: float = field(init=False)
    roi: float | None = field(init=False)
    payback_months: float | None = field(init=False)

    def __post_init__(self) -> None:
        for name in ("training_cost", "serving_cost_per_month", "benefit_per_month"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"{name}={value!r} must be a finite number >= 0")
        if not (math.isfinite(self.horizon_months) and self.horizon_months > 0):
            raise PlanError(f"horizon_months={self.horizon_months!r} must be > 0")
        total_cost = self.training_cost + self.serving_cost_per_month * self.horizon_months
        total_benefit = self.benefit_per_month * self.horizon_months
        net = self.benefit_per_month - self.serving_cost_per_month
        object.__setattr__(self, "total_cost", total_cost)
        object.__setattr__(self, "total_benefit", total_benefit)
        object.__setattr__(self, "roi", (total_benefit - total_cost) / total_cost if total_cost > 0 else None)
        object.__setattr__(self, "payback_months", self.training_cost / net if net > 0 else None)
