"""``training.lr: auto``: a learning rate picked by method and model size, from one stated rule.

    lr = base(setup) * (N_ref / N) ** (1/3), clamped to [1e-5, 3e-3]

    base(full)  = 2e-4   every weight trains
    base(other) = 1e-3   an adapter (LoRA, DoRA, AdaLoRA, QLoRA = LoRA on an NF4 base, any registered method)
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

This is a starting point, not a tuned value: an explicit ``training.lr`` always wins, and the summary
records the rate chosen and this rule (``lr_auto`` in summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass

REF_PARAMS = 22_700_000  # all-MiniLM-L6-v2 (the builtin ``minilm``: 22.7M parameters)
BASE_LR = {"full": 2e-4, "adapter": 1e-3}
LR_MIN, LR_MAX = 1e-5, 3e-3
RULE = "lr = base * (22.7M / N) ** (1/3), clamped to [1e-5, 3e-3]; base 2e-4 for full fine-tuning, 1e-3 for an adapter"


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
    kind = "full" if method is None else "adapter"
    setup = "full" if method is None else method + ("+nf4" if quantized else "")
    raw = BASE_LR[kind] * (REF_PARAMS / base_params) ** (1.0 / 3.0)
    lr = float(f"{min(LR_MAX, max(LR_MIN, raw)):.2g}")  # two significant digits: a rate a person would write
    clamp = "" if LR_MIN <= raw <= LR_MAX else f", clamped from {raw:.2g}"
    why = (
        f"{'full fine-tuning' if kind == 'full' else 'an adapter (' + setup + ')'}: base {BASE_LR[kind]:g} x "
        f"(22.7M / {base_params / 1e6:.3g}M) ** (1/3) = {lr:g}{clamp}"
    )
    return LrChoice(lr, setup, base_params, why)
