"""``training.lr: auto``: a learning rate picked by method and model size, from one stated rule.

    lr = base(setup) * (N_ref / N) ** (1/3), clamped to [1e-5, 3e-3] (AdaLoRA: [1e-5, 3e-2])

    base(full)    = 2e-4   every weight trains
    base(adalora) = 1e-2   AdaLoRA (on any base, NF4 included)
    base(other)   = 1e-3   an adapter (LoRA, DoRA, QLoRA = LoRA on an NF4 base, any registered method)
    N_ref       = 22.7M  parameters of all-MiniLM-L6-v2, where both bases were measured
    N           = parameters of the base model (adapters excluded; quantized weights by their element count)

Why these numbers. The bases come from MiniLM + SST-2 on this project's CPU (issue 19): full fine-tuning
reached 78.3% dev accuracy at 2e-4 and 54% at 1e-3 (it diverges), LoRA the reverse (undertrained at 2e-4,
best near 1e-3); ``benchmarks/bench_quality.py lr`` reruns that sweep. An adapter trains a few freshly
initialised low-rank directions, scaled by alpha / r, so it takes a rate several times the full
fine-tuning rate, as the published recipes do: RoBERTa-base on GLUE fine-tunes in full at 1e-5 ... 3e-5
(Liu et al. 2019) and with LoRA at 4e-4 ... 5e-4 (Hu et al. 2021, Table 9); QLoRA (Dettmers et al. 2023)
uses 2e-4 for 7B-13B and 1e-4 for 33B-65B. The optimal rate falls as models widen (each output sums more
terms, so one step moves it more); the cube root is the mildest power that fits those recipes: it gives
1.5e-4 for an adapter on a 7B model and 7e-5 on 65B, and 3e-5 for full fine-tuning at 7B (recipes
there use 1e-5 ... 2e-5: the rule errs high for full fine-tuning of large models). The clamp
keeps toy models (thousands of parameters) from getting rates no recipe uses.

AdaLoRA gets 10x the adapter rate (and a clamp 10x higher). Its update is s P diag(λ) Q with λ = 0 at the
start and P, Q held near orthonormal by its penalty, so the update's size is set by the r singular values
λ, and Adam moves each by about lr per step; LoRA's B has d x r entries, each moving about lr per step,
so at one rate LoRA's update grows about sqrt(d) times faster. The paper's GLUE runs are long (tens of
thousands of steps) and get there anyway; a run of a few hundred steps does not. Measured on MiniLM +
SST-2 (``benchmarks/bench_adalora.py``, 128 steps, init_r 12 -> target_r 8, seed 0): AdaLoRA 0.509 dev
accuracy at 1e-3 (chance), 0.611 at 3e-3, 0.807 at 1e-2, against LoRA r 8's 0.806 at 1e-3 and 0.796 at
3e-3 (benchmarks/results/adalora.md has the seeds). The 10x goes to every trainable tensor: giving it to
λ alone (``method_options.lambda_lr_ratio: 10`` at 1e-3) measured lower (0.783, 3 seeds; 0.790-0.794 with
1e-2 for every tensor: adalora.md, round 2).

This is a starting point, not a tuned value: an explicit ``training.lr`` always wins, and the summary
records the rate chosen and this rule (``lr_auto`` in summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass

REF_PARAMS = 22_700_000  # all-MiniLM-L6-v2 (the builtin ``minilm``: 22.7M parameters)
BASE_LR = {"full": 2e-4, "adapter": 1e-3, "adalora": 1e-2}
LR_MIN = 1e-5
LR_MAX = {"full": 3e-3, "adapter": 3e-3, "adalora": 3e-2}
RULE = ("lr = base * (22.7M / N) ** (1/3), clamped to [1e-5, 3e-3] ([1e-5, 3e-2] for AdaLoRA); base 2e-4 for "
        "full fine-tuning, 1e-2 for AdaLoRA, 1e-3 for any other adapter")


@dataclass(frozen=True)
class LrChoice:
    """The rate ``auto`` picked and why (written to summary.json as ``lr_auto``)."""

    lr: float
    setup: str  # "full" or the adapter method (with "+nf4" on a quantized base)
    base_params: int
    why: str

    def as_dict(self) -> dict[str, object]:
        return {"lr": self.lr, "setup": self.setup, "base_params": self.base_params, "rule": RULE, "why": self.why}


def auto_lr(method: str | None, base_params: int, quantized: bool = False) -> LrChoice:
    """The rule above for ``method`` (None: full fine-tuning) on a base of ``base_params`` parameters."""
    if base_params <= 0:
        raise ValueError(f"training.lr=auto: the base model has {base_params} parameters; expected > 0")
    kind = "full" if method is None else ("adalora" if method == "adalora" else "adapter")
    setup = "full" if method is None else method + ("+nf4" if quantized else "")
    raw = BASE_LR[kind] * (REF_PARAMS / base_params) ** (1.0 / 3.0)
    top = LR_MAX[kind]
    lr = float(f"{min(top, max(LR_MIN, raw)):.2g}")  # two significant digits: a rate a person would write
    clamp = "" if LR_MIN <= raw <= top else f", clamped from {raw:.2g}"
    who = {"full": "full fine-tuning", "adalora": "AdaLoRA (" + setup + ")"}.get(kind, f"an adapter ({setup})")
    why = (
        f"{who}: base {BASE_LR[kind]:g} x "
        f"(22.7M / {base_params / 1e6:.3g}M) ** (1/3) = {lr:g}{clamp}"
    )
    return LrChoice(lr, setup, base_params, why)
