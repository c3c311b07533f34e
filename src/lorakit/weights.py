"""Base weight access: how an adapter sees the frozen weight it adapts, whatever stores it.

Nothing else in lorakit branches on how a base weight is stored (STYLE.md rule 4). The canonical layout
of ``dense_weight`` is:

- ``linear``: (out_features, in_features) -- nn.Linear, quantized linears, and GPT-2 ``Conv1D`` (whose
  stored weight is the transpose, (in, out); ``fan_in_fan_out`` is True for it);
- ``embedding``: (num_embeddings, embedding_dim); in/out features are num_embeddings/embedding_dim;
- ``conv``: (out_channels, in_channels // groups, *kernel_size).

A quantized linear is any module that provides ``in_features``, ``out_features``, ``bias``,
``dense_weight(dtype)`` and ``set_dense_weight(weight)`` itself (lorakit's NF4 linear does), and
optionally ``matmul(x)`` (x @ W^T saving only its packed storage for backward); other storages register
a factory with :func:`register_access`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Weights cast at a time by ``WeightAccess.matmul`` (~4M, as lorakit.quant's dequantization chunks).
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n_out: int, n_in: int):
    rows = max(1, _CHUNK_ELEMENTS // max(1, n_in))
    for r0 in range(0, n_out, rows):
        yield r0, min(n_out, r0 + rows)


class _CastMatmul(torch.autograd.Function):
    """y = x @ W^T with W (out, in) stored in another dtype (a bf16 base under an fp32 adapter), cast
    to x's dtype chunk by chunk of rows (under autocast the matmul casts again, transiently). Autograd
    saves W as stored (the base's own tensor), never a cast copy; backward casts again for dx = dy @ W."""

    @staticmethod
    def forward(ctx, x, w):  # x: (N, in)
        ctx.save_for_backward(w)
        if w.numel() <= _CHUNK_ELEMENTS:
            return x @ w.to(x.dtype).t()
        out = x.new_empty(x.shape[0], w.shape[0])
        for r0, r1 in _row_chunks(*w.shape):
            out[:, r0:r1] = x @ w[r0:r1].to(x.dtype).t()
        return out  # (N, out)

    @staticmethod
    def backward(ctx, grad_out):  # (N, out)
        if not ctx.needs_input_grad[0]:
            return None, None
        (w,) = ctx.saved_tensors
        grad_x = None
        for r0, r1 in _row_chunks(*w.shape):
            part, wc = grad_out[:, r0:r1], w[r0:r1].to(grad_out.dtype)
            grad_x = part @ wc if grad_x is None else grad_x.addmm_(part, wc)
        return grad_x, None


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T for a quantized base without its own ``matmul``: W is dequantized through the access
    in forward and again in backward, so no dense copy is saved."""

    @staticmethod
    def forward(ctx, x, access):  # x: (N, in)
        ctx.access = access
        return x @ access.dense_weight(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.access.dense_weight(grad_out.dtype), None


@dataclass
class WeightAccess:
    """A view of one frozen base module's weight in the canonical layout."""

    module: nn.Module
    kind: str  # "linear" | "embedding" | "conv"
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False  # stored weight is (in, out): GPT-2 Conv1D
    quantized: bool = False

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base computes in (the compute dtype for quantized weights)."""
        if self.quantized:
            return getattr(self.module, "compute_dtype", torch.float32)
        return self.module.weight.dtype

    def numel(self) -> int:
        """Logical element count of the weight (not storage bytes)."""
        if self.kind == "conv":
            w = self.module.weight
            return w.numel()
        return self.in_features * self.out_features

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in canonical layout (dequantized if needed). Not a copy for dense bases."""
        if self.quantized:
            return self.module.dense_weight(dtype or self.dtype)
        w = self.module.weight
        if self.fan_in_fan_out:
            w = w.t()
        return w if dtype is None else w.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias, in x's dtype: the base's product on another input (DoRA's dropped
        input), with the weight used at x's precision. x: (..., in) -> (..., out).

        Autograd keeps no dense copy of W for backward (issue 14): a quantized base saves only its packed
        storage (its own ``matmul``, else re-dequantized in backward); a frozen dense base in another
        dtype, or under autocast, saves its own weight and casts it again in backward; a base in x's
        dtype without autocast goes through ``F.linear``, which saves W itself.
        """
        lead = x.shape[:-1]
        if self.quantized:
            own = getattr(self.module, "matmul", None)
            if callable(own):
                return own(x)
            y = _DequantMatmul.apply(x.reshape(-1, self.in_features), self)
            return y.reshape(*lead, self.out_features)
        w = self.dense_weight()  # canonical view of the stored weight: no copy
        autocast = torch.is_autocast_enabled(x.device.type)  # F.linear would save autocast's cast copy
        if w.requires_grad or (w.dtype == x.dtype and not autocast):  # saves W itself, or trains it
            return F.linear(x, w.to(x.dtype))
        return _CastMatmul.apply(x.reshape(-1, self.in_features), w).reshape(*lead, self.out_features)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight (canonical layout); quantized bases re-quantize."""
        if self.quantized:
            self.module.set_dense_weight(weight)
            return
        target = self.module.weight
        if self.fan_in_fan_out:
            weight = weight.t()
        if weight.shape != target.shape:
            raise ValueError(f"set_dense_weight: shape {tuple(weight.shape)} != base {tuple(target.shape)}")
        target.copy_(weight.to(target.dtype))


_FACTORIES: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], WeightAccess]]] = []


def register_access(
    predicate: Callable[[nn.Module], bool], factory: Callable[[nn.Module], WeightAccess]
) -> None:
    """Teach lorakit a new weight storage (checked before the built-in kinds)."""
    _FACTORIES.insert(0, (predicate, factory))


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer with a transposed (in, out) weight."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def weight_access(module: nn.Module) -> WeightAccess | None:
    """The access for a module lorakit can adapt, or None if its type is unsupported."""
    for predicate, factory in _FACTORIES:
        if predicate(module):
            return factory(module)
    if all(hasattr(module, a) for a in ("dense_weight", "set_dense_weight", "in_features", "out_features")):
        return WeightAccess(module, "linear", module.in_features, module.out_features, quantized=True)
    if isinstance(module, nn.Linear):
        return WeightAccess(module, "linear", module.in_features, module.out_features)
    if is_gpt2_conv1d(module):
        n_in, n_out = module.weight.shape
        return WeightAccess(module, "linear", n_in, n_out, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return WeightAccess(module, "embedding", module.num_embeddings, module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return WeightAccess(module, "conv", module.in_channels, module.out_channels)
    return None


def is_linear_like(module: nn.Module) -> bool:
    access = weight_access(module)
    return access is not None and access.kind == "linear"
