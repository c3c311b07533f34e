"""4-bit (NF4/FP4) and 8-bit storage of frozen base weights for QLoRA; knows nothing about adapters.

- :mod:`lorakit.quant.nf4`: blockwise (de)quantization and double quantization (pure functions);
- :mod:`lorakit.quant.linear`: :class:`NF4Linear`, the frozen quantized linear layer;
- :mod:`lorakit.quant.model`: :func:`quantize` a model in place, :func:`dequantize_model`, memory accounting;
- :mod:`lorakit.quant.loading`: :func:`load_quantized`, quantize-on-load from safetensors shards;
- :mod:`lorakit.quant.bnb`: weight access for bitsandbytes ``Linear4bit`` (only when installed).
"""

from lorakit.quant import bnb as _bnb  # noqa: F401  (registers bitsandbytes weight access; lazy import)
from lorakit.quant.linear import NF4Linear, QuantizedWeight
from lorakit.quant.loading import load_quantized
from lorakit.quant.model import (
    bits_per_param,
    dequantize_model,
    eligible_layers,
    quantize,
    quantized_layers,
    storage_bytes,
)
from lorakit.quant.nf4 import QuantError, QuantSpec, dequantize_blockwise, quantize_blockwise

__all__ = [
    "NF4Linear",
    "QuantError",
    "QuantSpec",
    "QuantizedWeight",
    "bits_per_param",
    "dequantize_blockwise",
    "dequantize_model",
    "eligible_layers",
    "load_quantized",
    "quantize",
    "quantize_blockwise",
    "quantized_layers",
    "storage_bytes",
]
