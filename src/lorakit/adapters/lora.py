"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W0 x + (alpha / r) * B A x,   A: (r, k), B: (d, r), B = 0 at init so h = W0 x at the start.

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) instead.
Adapter parameters are kept in fp32 (by default) whatever the base dtype; inputs are cast to the
adapter dtype and the update is cast back to the base output's dtype.

Tensor names follow PEFT: ``lora_A.weight``/``lora_B.weight`` for Linear, GPT-2 Conv1D and Conv, and
``lora_embedding_A``/``lora_embedding_B`` for Embedding. The registry entry at the end of this file says
the rest: the layer kinds, the inits that ride on LoRA (PiSSA, OLoRA, LoftQ: ``lora_init.py``), its
LoRA+ optimizer groups (``loraplus.py``) and its PEFT format (``peft_type`` "LORA").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import adapter_input, copy_peft_state
from lorakit.adapters.corda import CORDA_OPTIONS, corda_init
from lorakit.adapters.lora_init import WEIGHT_INITS as _INITS_OF_W
from lorakit.adapters.lora_init import pissa_init  # noqa: F401  (pissa_init: moved there)
from lorakit.adapters.loraplus import LORAPLUS_OPTIONS, loraplus_groups, validate_loraplus
from lorakit.config import AdapterConfig, ConfigError
from lorakit.methods import Init, Method, PeftCodec, json_field, register
from lorakit.weights import WeightAccess


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(nn.Module):
    """LoRA on a linear map (nn.Linear, GPT-2 Conv1D, or a quantized linear).

    Args:
        in_features, out_features: k and d of the base weight W0 (d, k).
        r: rank. alpha: scaling numerator. dropout: dropout on the adapter input.
        use_rslora: scale alpha/sqrt(r). init: "default" | "gaussian" (B = 0 either way).
        dtype, device: of the adapter parameters (fp32 by default).
    """

    subtracts_init = False  # set by a residual init (PiSSA, OLoRA), with the buffers lora_A/B_init

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)  # (r, k)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)  # (d, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        reset_lora(self.lora_A.weight, self.lora_B.weight, r, init)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x) in the adapter dtype: (..., k) -> (..., r); x is cast only when that changes the
        product (``adapter_input``). The dropout module is only called when it can change x (training,
        p > 0); it then sees the adapter-dtype x, as in PEFT."""
        a = self.lora_A.weight
        drop = self.training and type(self.dropout) is not nn.Identity
        x = adapter_input(x, a.dtype, cast=drop)
        if drop:
            x = self.dropout(x)
        return F.linear(x, a)

    def _init_out(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B0 A0 x for an init that trains on the residual W - s B0 A0 (PiSSA, OLoRA:
        ``lora_init.remember_init``); no dropout, as it stands for part of the base term."""
        a0, b0 = self.lora_A_init, self.lora_B_init
        return F.linear(F.linear(adapter_input(x, a0.dtype), a0), b0) * self.scaling

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output, in the adapter dtype: scale * B A dropout(x) (minus
        scale * B0 A0 x for a residual init). x: (..., k) -> (..., d)."""
        out = F.linear(self._down(x), self.lora_B.weight) * self.scaling
        return out - self._init_out(x) if self.subtracts_init else out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        if self.subtracts_init:  # the residual base W x - s B0 A0 x; the base weight itself is W
            base_out = base_out - self._init_out(x).to(base_out.dtype)
        h = self._down(x)  # (..., r)
        b = self.lora_B.weight  # (d, r)
        if base_out.dtype == b.dtype and not torch.is_autocast_enabled(b.device.type):
            # base_out + scale * h B^T as one addmm: no (..., d) temporaries for the product and its scaling.
            # (Not under autocast: there the product is rounded to the autocast dtype before it is scaled
            # and added, as in PEFT, and a fused addmm would round once instead.)
            d = base_out.shape[-1]
            y = torch.addmm(base_out.reshape(-1, d), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
            return y.view(base_out.shape)
        return base_out + (F.linear(h, b) * self.scaling).to(base_out.dtype)

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        delta = self.lora_B.weight @ self.lora_A.weight  # (d, k)
        if self.subtracts_init:
            delta = delta - self.lora_B_init @ self.lora_A_init
        return delta * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        copy_peft_state("lora", self.peft_state(), state)


class LoraEmbedding(nn.Module):
    """LoRA on an embedding table: E' = E + scale * (B A)^T, rows looked up by token id.

    A: (r, num_embeddings), B: (embedding_dim, r). As in PEFT, A starts at zero and B Gaussian
    (the lookup reads columns of A, so the zero factor is the one indexed by the token).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "default",
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.padding_idx = padding_idx
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, dtype=dtype, device=device))
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        rows = F.embedding(x, self.lora_embedding_A.t(), padding_idx=self.padding_idx)  # (..., r)
        return base_out + (rows @ self.lora_embedding_B.t() * self.scaling).to(base_out.dtype)

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling  # (num_embeddings, dim)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        copy_peft_state("lora", self.peft_state(), state)


class LoraConv(nn.Module):
    """LoRA on Conv1d/Conv2d: A is a conv with the base's kernel/stride/padding into r channels,
    B a 1x1 conv back to the output channels, so delta W = B @ A reshaped to the kernel."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        conv = type(base)
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, use_rslora)
        device = base.weight.device
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False, dtype=dtype, device=device)
        self.lora_B = conv(r, base.out_channels, 1, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        reset_lora(self.lora_A.weight, self.lora_B.weight, r, init)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        y = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return base_out + (y * self.scaling).to(base_out.dtype)

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in, *k), (out, r, 1..)
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    load_peft_state = LoraLinear.load_peft_state


@torch.no_grad()
def reset_lora(a: torch.Tensor, b: torch.Tensor, r: int, init: str) -> None:
    """B = 0 so the adapted model starts equal to the base; A per ``init`` (PEFT's defaults)."""
    if init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


# inits computed from the base weight (lora_init.py; CorDA also from its inputs, corda.py)
WEIGHT_INITS = {**_INITS_OF_W, "corda": corda_init}


def build_lora(access: WeightAccess, cfg: AdapterConfig, module_name: str) -> nn.Module:
    r, alpha = cfg.rank_for(module_name), cfg.alpha_for(module_name)
    init = "default" if cfg.init in WEIGHT_INITS else cfg.init  # weight inits act on linears only
    if access.kind == "embedding":
        return LoraEmbedding(access.in_features, access.out_features, r, alpha, cfg.use_rslora, init,
                             padding_idx=getattr(access.module, "padding_idx", None), device=access.device)
    if access.kind == "conv":
        return LoraConv(access.module, r, alpha, cfg.dropout, cfg.use_rslora, init)
    adapter = LoraLinear(access.in_features, access.out_features, r, alpha, cfg.dropout, cfg.use_rslora,
                         init, device=access.device)
    if cfg.init in WEIGHT_INITS:  # PiSSA, OLoRA, LoftQ, CorDA: computed from the base weight
        WEIGHT_INITS[cfg.init](adapter, access, module_name, cfg)
    return adapter


# ---- PEFT's "LORA" adapter_config.json: the fields beyond those every LoRA-family type shares ----
def lora_from_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        r=json_field(d, "r", int, 8),
        use_rslora=json_field(d, "use_rslora", bool, False),
        rank_pattern=json_field(d, "rank_pattern", dict, {}),
    )


def lora_to_peft(cfg: AdapterConfig, adapters: Mapping[str, nn.Module]) -> dict[str, Any]:
    return {"use_rslora": cfg.use_rslora, "use_dora": False}


# Inits that only set starting values (DoRA shares them); LoRA adds those computed from W below.
LORA_INITS = {
    "default": Init(True, "A Kaiming-uniform (a=sqrt(5)), B = 0"),
    "gaussian": Init("gaussian", "A ~ N(0, 1/r), B = 0"),
}

LORA = register(
    Method(
        "lora",
        build_lora,
        kinds=("linear", "embedding", "conv"),
        peft=PeftCodec(
            "LORA", lora_to_peft, lora_from_peft, rank_keys=("lora_A.weight", "lora_embedding_A")
        ),
        # inits computed from the base weight (lorakit/adapters/lora_init.py): PiSSA and OLoRA move a
        # rank-r part of W into the adapter, which subtracts it again (the base weight stays W; saved
        # files are converted to rank 2r); LoftQ fits the adapter to a quantized base's error.
        inits={
            **LORA_INITS,
            "pissa": Init("pissa", "PiSSA: A, B from the top-r singular triplets of W; trains on the residual",
                          changes_base=True),
            "olora": Init("olora", "OLoRA: B, A from the QR decomposition of W; trains on the residual",
                          changes_base=True),
            "loftq": Init(True, "LoftQ: s B A = SVD_r(W - Q(W)) on a quantized base (needs a quant section)",
                          reads_full_precision=True),
            "corda": Init("corda", "CorDA: B, A from the SVD of W times its inputs' covariance on calibration "
                          "rows; trains on the residual", changes_base=True, reads_inputs=True,
                          options=tuple(CORDA_OPTIONS)),
        },
        options={**LORAPLUS_OPTIONS, **CORDA_OPTIONS},
        optimizer=loraplus_groups,
        validate=validate_loraplus,
        doc="LoRA, low-rank adaptation (Hu et al. 2021)",
    )
)
