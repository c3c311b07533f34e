"""AdaLoRA's rank allocator: importance scores of singular triplets and the global rank budget.

AdaLoRA (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512, section 3.2-3.3) parameterises each
adapted matrix as P diag(lambda) Q and prunes singular values whose triplet is least important, under one
budget shared by all matrices. Per parameter w with gradient g (Eq. 8-10):

    I_t   = |w * g|                                            sensitivity
    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t           smoothed sensitivity
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * |I_t - Ibar_t|  uncertainty
    s_t(w) = Ibar_t * Ubar_t                                   score

The score of triplet i (Eq. 7) is s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij). The budget b(t), counted in
singular values over all matrices, is held at b_0 = init_r * n for the first ``tinit`` steps, falls
cubically to b_T = target_r * n (Eq. 12)

    b(t) = b_T + (b_0 - b_T) * (1 - (t - tinit) / (T - tinit - tfinal))^3      (floored to an integer)

and is held at b_T for the last ``tfinal`` steps. Every ``delta_t`` steps of the falling phase, and once at
t = T - tfinal, only the b(t) triplets with the highest scores keep their singular value.

The schedule fields may be fractions of T (:func:`resolve_schedule`): a float in (0, 1) is a fraction, an
integer a step count. The defaults (``AdapterConfig``: tinit 0.1, tfinal 0.4, delta_t 0.01) follow the
paper's and PEFT's guidance, scaled to the run: warm up before pruning (the triplets must carry signal before
their importance is trusted), stop pruning well before the end (the kept ranks need steps to recover), mask
often. The paper's GLUE runs (Appendix E; DeBERTaV3-base SST-2: 24 epochs of batch 32, about 50k steps,
t_i 6,000, t_f 22,000, delta_T 100) sit at 12% / 44% / 0.2% of T; PEFT's own defaults (0 / 0 / 1) prune
from the first step to the last, which leaves a short run no steps to learn before or after pruning.

Names follow PEFT (peft/tuners/adalora/layer.py): Q is ``lora_A`` (r, in), lambda is ``lora_E`` (r, 1),
P is ``lora_B`` (out, r). This module is pure tensor bookkeeping: it reads the three tensors of each matrix
and returns boolean keep-masks; ``lorakit.adapters.adalora`` applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.config import ConfigError


@dataclass(frozen=True)
class BudgetSchedule:
    """The cubic budget schedule (Eq. 12). Steps ``t`` count completed optimizer steps (1 = after the first).

    Args:
        init_budget: b_0, singular values kept at the start (init_r x number of matrices).
        target_budget: b_T, singular values kept at the end (target_r x number of matrices).
        tinit, tfinal: steps held at b_0 at the start and at b_T at the end.
        total_step: T, the total number of optimizer steps; must exceed tinit + tfinal.
        delta_t: masking interval during the falling phase.
    """

    init_budget: int
    target_budget: int
    tinit: int
    tfinal: int
    total_step: int
    delta_t: int = 1

    def __post_init__(self) -> None:
        if self.total_step <= self.tinit + self.tfinal:
            raise ConfigError(
                f"total_step={self.total_step} is too small: AdaLoRA needs total_step > tinit + tfinal "
                f"= {self.tinit} + {self.tfinal} so the budget has steps to fall over"
            )

    @property
    def final_step(self) -> int:
        """T - tfinal: the step of the final masking; the ranks are fixed after it."""
        return self.total_step - self.tfinal

    def budget(self, t: int) -> int:
        """b(t): b_0 up to tinit, cubic fall (floored) to b_T at T - tfinal, b_T after."""
        if t <= self.tinit:
            return self.init_budget
        if t >= self.final_step:
            return self.target_budget
        frac = 1.0 - (t - self.tinit) / (self.total_step - self.tinit - self.tfinal)
        return int(self.target_budget + (self.init_budget - self.target_budget) * frac**3)

    def is_masking_step(self, t: int) -> bool:
        """Masking every delta_t steps of the falling phase, and always at the final step T - tfinal."""
        if t <= self.tinit or t > self.final_step:
            return False
        return t == self.final_step or t % self.delta_t == 0


def schedule_steps(field_name: str, value: int | float, total_step: int, minimum: int = 0) -> int:
    """A schedule field in steps: an int as it is, a float in (0, 1) as round(value * T), at least
    ``minimum`` (delta_t: 1). Field checks are ``AdapterConfig``'s; this only converts."""
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{field_name}={value!r} is invalid; a fraction of the total steps must be in (0, 1)")
        return max(minimum, int(round(value * total_step)))
    return int(value)


def resolve_schedule(
    tinit: int | float, tfinal: int | float, delta_t: int | float, total_step: int
) -> tuple[int, int, int]:
    """(tinit, tfinal, delta_t) in steps for a run of ``total_step`` optimizer steps; raises unless
    total_step > tinit + tfinal (the budget needs steps to fall over)."""
    t_i = schedule_steps("tinit", tinit, total_step)
    t_f = schedule_steps("tfinal", tfinal, total_step)
    d_t = schedule_steps("delta_t", delta_t, total_step, minimum=1)
    if total_step <= t_i + t_f:
        raise ConfigError(
            f"total_step={total_step} is too small: AdaLoRA needs total_step > tinit + tfinal "
            f"= {t_i} + {t_f} (from tinit={tinit!r}, tfinal={tfinal!r}) so the budget has steps to fall over"
        )
    return t_i, t_f, d_t


Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (lora_A (r, in), lora_E (r, 1), lora_B (out, r))


class RankAllocator:
    """Importance EMAs of every triplet parameter and global top-b selection of singular values.

    Args:
        triplets: matrix name -> (lora_A, lora_E, lora_B) parameters, read in place (their ``.grad`` too).
        beta1, beta2: EMA factors of sensitivity and uncertainty, strictly in (0, 1).
    """

    def __init__(self, triplets: Mapping[str, Triplet], beta1: float = 0.85, beta2: float = 0.85) -> None:
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value!r} is invalid; expected a number strictly between 0 and 1")
        if not triplets:
            raise ConfigError("AdaLoRA rank allocator: no adapted matrices to allocate ranks over")
        self.triplets = dict(triplets)
        self.beta1, self.beta2 = beta1, beta2
        self.ipt_avg: dict[str, list[torch.Tensor]] = {}  # Ibar per tensor of each triplet
        self.unc_avg: dict[str, list[torch.Tensor]] = {}  # Ubar per tensor of each triplet

    @property
    def init_budget(self) -> int:
        return sum(t[1].shape[0] for t in self.triplets.values())

    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of sensitivity and uncertainty from the current weights and gradients."""
        if all(t.grad is None for triplet in self.triplets.values() for t in triplet):
            raise RuntimeError(
                "AdaLoRA budget step found no gradients: call it after loss.backward() (and optimizer.step()) "
                "and before optimizer.zero_grad()"
            )
        for name, triplet in self.triplets.items():
            if name not in self.ipt_avg:
                self.ipt_avg[name] = [torch.zeros_like(t, dtype=torch.float32) for t in triplet]
                self.unc_avg[name] = [torch.zeros_like(t, dtype=torch.float32) for t in triplet]
            for w, ibar, ubar in zip(triplet, self.ipt_avg[name], self.unc_avg[name]):
                g = w.grad if w.grad is not None else torch.zeros_like(w)
                ipt = (w.float() * g.float()).abs()  # I = |w * dL/dw|
                ibar.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                ubar.mul_(self.beta2).add_((ipt - ibar).abs(), alpha=1 - self.beta2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score of each singular value i: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), shape (r,)."""
        if not self.ipt_avg:
            raise RuntimeError("AdaLoRA: no importance scores yet (update_importance was never called)")
        scores = {}
        for name in self.triplets:
            s_a, s_e, s_b = (i * u for i, u in zip(self.ipt_avg[name], self.unc_avg[name]))
            scores[name] = s_e.view(-1) + s_a.mean(dim=1) + s_b.mean(dim=0)  # (r,)
        return scores

    def masks_for_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep-masks (bool, (r,)) keeping exactly the ``budget`` highest-scoring triplets over all matrices.

        PEFT zeroes every triplet at or below the k-th smallest score (k = b_0 - budget), which drops more
        than asked when scores tie (e.g. several exact zeros); ranking with a stable sort keeps exactly
        ``budget`` (ties broken by matrix order, then rank index) and equals PEFT's choice without ties.
        """
        scores = self.triplet_scores()
        names = list(scores)
        flat = torch.cat([scores[n].cpu() for n in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[: max(0, min(budget, flat.numel()))]] = True
        out, start = {}, 0
        for n in names:
            r = scores[n].numel()
            out[n] = keep[start : start + r].to(scores[n].device)
            start += r
        return out

    def reset(self) -> None:
        """Drop the EMAs (after the final masking they are no longer needed)."""
        self.ipt_avg.clear()
        self.unc_avg.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "ipt_avg": {n: [t.clone() for t in v] for n, v in self.ipt_avg.items()},
            "unc_avg": {n: [t.clone() for t in v] for n, v in self.unc_avg.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("ipt_avg", "unc_avg"):
            unknown = sorted(set(state.get(key, {})) - set(self.triplets))
            if unknown:
                raise KeyError(
                    f"AdaLoRA allocator state: {key} names matrices not in the model: {unknown[:3]}"
                )
        self.ipt_avg = {n: [t.clone() for t in v] for n, v in state.get("ipt_avg", {}).items()}
        self.unc_avg = {n: [t.clone() for t in v] for n, v in state.get("unc_avg", {}).items()}
