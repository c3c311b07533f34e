"""AdaLoRA's starting point and learning rates: the init of P and Q (``AdapterConfig.init``) and the rate of
the singular values λ (``method_options.lambda_lr_ratio``).

Inits (λ = 0 under every one, so ΔW = P diag(λ) Q = 0 and the model starts at its base):

- "gaussian": P, Q ~ N(0, 0.02), PEFT's ``SVDLinear.reset_lora_parameters``; use it for PEFT's exact
  training trajectory (the squared-form penalty ||PᵀP - I||² + ||QQᵀ - I||² starts near r per tensor).
- "orthogonal": P (out, r) with orthonormal columns and Q (r, in) with orthonormal rows (QR of a Gaussian,
  ``torch.nn.init.orthogonal_``, from the global RNG): the point the orthogonal penalty pulls towards, so the
  penalty starts at 0 and the first steps train the task rather than the bases. (With r > in or r > out,
  the side that cannot be orthonormal is orthogonal the other way round.)
- "default": one of the two, :data:`DEFAULT_INIT`.

The λ rate: the update's size is set by the r singular values λ, which start at 0, and Adam moves each by
about lr per step, while P's and Q's entries (about 1/sqrt(d) in an orthonormal basis) need the adapter
rate. ``lambda_lr_ratio`` gives λ (``lora_E``) ``lr x ratio`` and every other trainable parameter
(P, Q, a trained head) ``lr``. A ratio of 1 means the trainer's plain groups (and PEFT's optimizer).

Why neither is the default: on MiniLM + SST-2 (128 steps, init_r 12 -> target_r 8, benchmarks/results/
adalora.md round 2) the orthogonal init (with tinit 0.2, tfinal 0.3) moved the 3-seed mean by +0.4 points
(inside the noise), and λ-only 10x at lr 1e-3 scored 0.65 points below one rate of 1e-2 for every tensor
(0.7833 vs 0.7898). PEFT's init and one rate stay the defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.adapters.base import named_param_groups
from lorakit.config import ConfigError
from lorakit.methods import Init, Option
from lorakit.validation import check_number

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig

DEFAULT_INIT = "gaussian"
DEFAULT_LAMBDA_LR_RATIO = 1.0

ADALORA_INITS = {
    "default": Init(True, f"P and Q as {DEFAULT_INIT!r}; λ = 0"),
    "gaussian": Init(True, "P, Q ~ N(0, 0.02) (PEFT's); λ = 0"),
    "orthogonal": Init(True, "P, Q orthonormal (QR of a Gaussian); λ = 0"),
}


@torch.no_grad()
def reset_adalora(q: torch.Tensor, e: torch.Tensor, p: torch.Tensor, init: str) -> None:
    """Q (r, in), λ (r, 1), P (out, r) as ``init`` says (see the module docstring); λ = 0 always."""
    init = DEFAULT_INIT if init == "default" else init
    if init == "orthogonal":  # QR in fp32 (it has no bf16/fp16 kernel), then cast
        for t in (q, p):
            if t.device.type != "meta":
                t.copy_(nn.init.orthogonal_(torch.empty(t.shape, dtype=torch.float32, device=t.device)))
    elif init == "gaussian":
        nn.init.normal_(q, std=0.02)
        nn.init.normal_(p, std=0.02)
    else:
        raise ConfigError(f"init={init!r} is not an AdaLoRA init; expected one of {list(ADALORA_INITS)}")
    nn.init.zeros_(e)


def _ratio(field_name: str, value: Any) -> None:
    check_number(field_name, value, lambda v: v > 0, "a positive number (e.g. 10; 1 = the plain rate)")


ADALORA_LR_OPTIONS = {
    "lambda_lr_ratio": Option(
        DEFAULT_LAMBDA_LR_RATIO, _ratio, "AdaLoRA: the singular values' (lora_E) learning rate / training.lr"
    ),
}


def adalora_groups(
    model: nn.Module, cfg: AdapterConfig, lr: float, weight_decay: float
) -> list[dict[str, Any]] | None:
    """The optimizer groups for ``lambda_lr_ratio`` != 1 (None for 1: the trainer's plain groups).

    Weight decay as in the plain groups (matrices decay, vectors do not; λ is stored (r, 1) and decays
    there too, so only its rate changes). Each group carries a ``name``."""
    ratio = float(cfg.option("lambda_lr_ratio"))
    if ratio == 1.0:
        return None
    # the plain rate first: the trainer logs the first group's lr
    groups: dict[str, list] = {"decay": [], "no_decay": [], "lambda": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("lora_E"):
            groups["lambda"].append(p)
        else:
            groups["decay" if p.ndim >= 2 else "no_decay"].append(p)
    settings = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "lambda": (lr * ratio, weight_decay)}
    return named_param_groups("adalora", groups, settings)
