"""Weight access for bitsandbytes 4-bit layers (transformers ``load_in_4bit`` models).

With this registered, lorakit adapters sit on a bitsandbytes ``Linear4bit`` exactly as on lorakit's own
NF4Linear: they only see ``dense_weight`` / ``set_dense_weight`` (STYLE.md rule 4). bitsandbytes is an
optional dependency: it is imported only inside the functions below, when such a layer is met.

bitsandbytes 0.50 on CPU (see REFERENCE.md): ``Linear4bit`` quantizes only on ``.to(device)``; and on
CPUs with AVX512-BF16 its first eval-mode forward repacks the 4-bit weight into a CPU layout
(``quant_state.packing_format_for_cpu``). ``dense_weight`` unpacks a copy in that case, and says so
clearly when the layer is not quantized yet.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.quant.nf4 import QuantError
from lorakit.weights import WeightAccess, register_access

_BNB_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4")


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (checked by class, without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in _BNB_4BIT


def _state(module: nn.Module):
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        raise QuantError(
            f"bitsandbytes {type(module).__name__} ({module.out_features}x{module.in_features}) is not quantized "
            "yet: bitsandbytes quantizes on .to(device); move the model (e.g. model.to('cpu')) first"
        )
    return qs


@dataclass
class BnbWeightAccess(WeightAccess):
    """WeightAccess for a bitsandbytes Linear4bit: dequantize_4bit for reads, quantize_4bit for writes."""

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.module, "compute_dtype", None) or torch.float32

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        qs = _state(self.module)
        data = self.module.weight.data
        if getattr(qs, "packing_format_for_cpu", False):
            data, qs = bnbf._convert_weight_packed_for_cpu_inverse(data, qs)
        w = bnbf.dequantize_4bit(data, qs)
        return w.reshape(self.out_features, self.in_features).to(dtype or self.dtype)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize (lossy; warns with the measured mean abs error) with the layer's own settings."""
        import bitsandbytes.functional as bnbf

        qs = _state(self.module)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise QuantError(
                f"set_dense_weight: shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})"
            )
        src = weight.detach().to(self.module.weight.device, qs.dtype).contiguous()
        packed, state = bnbf.quantize_4bit(
            src, blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type=qs.quant_type
        )
        self.module.weight.data = packed
        self.module.weight.quant_state = state
        if hasattr(self.module, "quant_state"):
            self.module.quant_state = state
        err = float((bnbf.dequantize_4bit(packed, state).float() - src.float()).abs().mean())
        warnings.warn(
            f"re-quantized a {tuple(weight.shape)} weight to bitsandbytes {qs.quant_type}: mean abs error {err:.3g}",
            stacklevel=2,
        )


def _access(module: nn.Module) -> WeightAccess:
    return BnbWeightAccess(module, "linear", module.in_features, module.out_features, quantized=True)


register_access(is_bnb_4bit, _access)
