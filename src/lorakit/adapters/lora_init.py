"""LoRA initialisations computed from the base weight: PiSSA, OLoRA and LoftQ (``AdapterConfig.init``).

- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): A, B from the top-r singular triplets of
  W; the model computes the residual W - s B0 A0 plus the adapter (B0, A0: the initial factors).
- OLoRA (Buyukakyuz 2024, https://arxiv.org/abs/2406.01775): W = Q R (QR decomposition); B = Q[:, :r],
  A = R[:r] (as PEFT's ``olora_init``, not divided by the scale); likewise on the residual W - s B0 A0.
- LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): on a quantized base Q(W), A and B are the
  best rank-r fit of the quantization error, s B A = SVD_r(W - Q(W)), so QLoRA starts closer to the
  full-precision model. One alternating step (PEFT's default ``loftq_iter=1``): the quantized base is
  exactly what quantizing W gives, so the adapter is right on a fresh quantized base with no conversion.
  PEFT's ``loftq_init`` sets A, B to the fit without the scale (right only when alpha = r); here each
  factor is divided by sqrt(s), so s B A is the fit for any alpha.

PiSSA and OLoRA train on the residual W_res = W - s B0 A0. PEFT writes W_res into the base weight, so that
wherever the adapter is not applied (disabled, another adapter active, unloaded, deleted) the model is no
longer the base model. Here the base weight is never touched: the adapter keeps its initial factors
(buffers ``lora_A_init`` / ``lora_B_init``, not saved in checkpoints: they are recomputed from W) and
subtracts s B0 A0 x itself, so it computes W_res x + s B A x = W x + s (B A - B0 A0) x and every other
path sees the real W. The same factors convert the saved file, as PEFT's
``path_initial_model_for_weight_conversion`` does, to a rank-2r LoRA on that unchanged base
(``lorakit.io.conversion``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorakit.config import AdapterConfig, ConfigError
from lorakit.weights import WeightAccess

INIT_A, INIT_B = "lora_A_init", "lora_B_init"

# The full-precision weights LoftQ fits against, by module path, while ``full_precision`` is active.
_DENSE: list[Mapping[str, torch.Tensor]] = []


def remember_init(adapter: nn.Module) -> None:
    """Keep copies of the adapter's initial A, B: it subtracts s B0 A0 x from then on (the residual the
    init trains on, with the base weight left as it is) and the saved file is converted with them."""
    adapter.register_buffer(INIT_A, adapter.lora_A.weight.detach().clone(), persistent=False)
    adapter.register_buffer(INIT_B, adapter.lora_B.weight.detach().clone(), persistent=False)
    adapter.subtracts_init = True


def initial_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) of an adapter whose init changed the base weight, else None."""
    a0, b0 = getattr(adapter, INIT_A, None), getattr(adapter, INIT_B, None)
    return (a0, b0) if a0 is not None and b0 is not None else None


def dense_linear(access: WeightAccess, module_name: str, init: str, r: int) -> torch.Tensor:
    """The base weight (out, in) in fp32, for an init computed from it."""
    if access.kind != "linear" or access.quantized:
        raise ConfigError(
            f"init={init!r} needs a dense linear base; {module_name!r} is {access.kind}"
            + (" (quantized)" if access.quantized else "")
        )
    if r > min(access.out_features, access.in_features):
        raise ConfigError(
            f"init={init!r}: r={r} for {module_name!r} exceeds its weight's smaller side "
            f"({access.out_features}x{access.in_features})"
        )
    return access.dense_weight(torch.float32).detach().clone()


@torch.no_grad()
def pissa_init(adapter: nn.Module, access: WeightAccess, module_name: str, cfg: AdapterConfig | None = None) -> None:
    """PiSSA: A = sqrt(S_r) V_r^T / sqrt(s), B = U_r sqrt(S_r) / sqrt(s); the adapter subtracts s B0 A0."""
    w = dense_linear(access, module_name, "pissa", adapter.r)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r, root_scale = adapter.r, math.sqrt(adapter.scaling)
    sqrt_s = s[:r].sqrt()
    adapter.lora_A.weight.copy_(sqrt_s[:, None] * vh[:r] / root_scale)
    adapter.lora_B.weight.copy_(u[:, :r] * sqrt_s[None, :] / root_scale)
    remember_init(adapter)


@torch.no_grad()
def olora_init(adapter: nn.Module, access: WeightAccess, module_name: str, cfg: AdapterConfig | None = None) -> None:
    """OLoRA: W = Q R; B = Q[:, :r], A = R[:r] (PEFT's ``olora_init``); the adapter subtracts s B0 A0."""
    w = dense_linear(access, module_name, "olora", adapter.r)
    q, rr = torch.linalg.qr(w)
    adapter.lora_A.weight.copy_(rr[: adapter.r])
    adapter.lora_B.weight.copy_(q[:, : adapter.r])
    remember_init(adapter)


@contextlib.contextmanager
def full_precision(weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within this block, ``init="loftq"`` fits each quantized module's adapter to ``weights[path]``
    (its full-precision (out, in) weight, taken before quantizing; see :func:`dense_weights`)."""
    _DENSE.append(weights)
    try:
        yield
    finally:
        _DENSE.pop()


def dense_weights(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """fp32 (out, in) copies of the weights of ``layers`` (path -> module), for :func:`full_precision`."""
    from lorakit.weights import weight_access

    out = {}
    for name, module in layers.items():
        access = weight_access(module)
        if access is not None and access.kind == "linear":
            out[name] = access.dense_weight(torch.float32).detach().clone()
    return out


def loftq_factors(
    weight: torch.Tensor, quantized: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling * B A the best rank-r fit (SVD) of ``weight - quantized``, both (out, in)."""
    u, s, vh = torch.linalg.svd(weight.float() - quantized.float(), full_matrices=False)
    root = s[:r].sqrt() / math.sqrt(scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq_init(adapter: nn.Module, access: WeightAccess, module_name: str, cfg: AdapterConfig | None = None) -> None:
    """LoftQ (one step): s B A = SVD_r(W - Q) on a quantized base Q; the base is left as it is. A layer
    that is not quantized has no quantization error: it keeps the default init (B = 0)."""
    if access.kind != "linear" or not access.quantized:
        return
    dense = next((d[module_name] for d in reversed(_DENSE) if module_name in d), None)
    if dense is None:
        raise ConfigError(
            f"init='loftq' needs the full-precision weight of {module_name!r} (LoftQ fits A, B to W - Q(W)): "
            "train with a quant section, or inject inside lorakit.adapters.lora_init.full_precision(weights)"
        )
    shape = (access.out_features, access.in_features)
    if tuple(dense.shape) != shape:
        raise ConfigError(
            f"init='loftq': the full-precision weight given for {module_name!r} has shape "
            f"{tuple(dense.shape)}; the layer is {shape}"
        )
    if adapter.r > min(shape):
        raise ConfigError(f"init='loftq': r={adapter.r} for {module_name!r} exceeds min{shape}")
    q = access.dense_weight(torch.float32)
    a, b = loftq_factors(dense.to(q.device), q, adapter.r, adapter.scaling)
    adapter.lora_A.weight.copy_(a)
    adapter.lora_B.weight.copy_(b)


# init name -> the function that carries it out on a LoraLinear (after its default init); CorDA's
# (lorakit.adapters.corda) joins them in lorakit.adapters.lora
WEIGHT_INITS = {"pissa": pissa_init, "olora": olora_init, "loftq": loftq_init}
