"""Base weight access: how an adapter sees the frozen weight it adapts, whatever stores it.

Nothing else in lorakit branches on how a base weight is stored (STYLE.md rule 4). The canonical layout
of ``dense_weight`` is:

- ``linear``: (out_features, in_features) -- nn.Linear, quantized linears, and GPT-2 ``Conv1D`` (whose
  stored weight is the transpose, (in, out); ``fan_in_fan_out`` is True for it);
- ``embedding``: (num_embeddings, embedding_dim); in/out features are num_embeddings/embedding_dim;
- ``conv``: (out_channels, in_channels // groups, *kernel_size).

A quantized linear is any module that provides ``in_features``, ``out_features``, ``bias``,
``dense_weight(dtype)`` and ``set_dense_weight(weight)`` itself (lorakit's NF4 linear does); other
storages register a factory with :func:`register_access`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


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
