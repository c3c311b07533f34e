"""NF4Linear: a frozen linear layer whose weight is stored blockwise in 4 (or 8) bits.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the frozen base weight is kept in NF4
and dequantized to ``compute_dtype`` on the fly for every matmul; only adapters train. The layer knows
nothing about adapters: they reach its weight through ``lorakit.weights.weight_access``, which treats
any module with ``in_features``, ``out_features``, ``dense_weight(dtype)`` and ``set_dense_weight(w)``
as a quantized linear.

Memory: forward and backward dequantize in chunks of output rows (about ``CHUNK_ELEMENTS`` weights at
a time) inside one autograd Function, which saves only the packed buffers for backward, so no
full-precision copy of the weight is alive between forward and backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.nf4 import (
    CHUNK_ELEMENTS,
    QuantError,
    QuantSpec,
    check_spec,
    dequantize_blockwise,
    double_dequantize,
    double_quantize,
    quantize_blockwise,
)

_QUANT_BUFFERS = ("qweight", "absmax", "absmax2", "absmax_offset")
# the storage a sharded trainer (FSDP2 shards nn.Parameters on dim 0) needs as frozen parameters; the 0-d
# ``absmax_offset`` stays a buffer (4 bytes, replicated)
SHARDABLE_STORAGE = ("qweight", "absmax", "absmax2")


def _absmax_fp32(spec: QuantSpec, absmax, absmax2, offset) -> torch.Tensor:
    if spec.double_quant:
        return double_dequantize(absmax, absmax2, offset, spec.double_quant_blocksize)
    return absmax


def _dequant_rows(
    spec: QuantSpec, qweight: torch.Tensor, absmax: torch.Tensor, r0: int, r1: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows r0:r1 of the (out, in) weight in ``dtype``; ``absmax`` is the fp32 per-block scale."""
    n_in, bs = spec.shape[1], spec.blocksize
    e0, e1 = r0 * n_in, r1 * n_in
    b0, b1 = e0 // bs, -(-e1 // bs)  # whole blocks covering the rows
    per_byte = 2 if spec.bits == 4 else 1
    codes = qweight[b0 * bs // per_byte : b1 * bs // per_byte]
    flat = dequantize_blockwise(codes, absmax[b0:b1], bs, spec.quant_type, dtype)
    return flat[e0 - b0 * bs : e1 - b0 * bs].view(r1 - r0, n_in)


def _row_chunks(spec: QuantSpec):
    n_out, n_in = spec.shape
    rows = max(1, CHUNK_ELEMENTS // n_in)
    for r0 in range(0, n_out, rows):
        yield r0, min(n_out, r0 + rows)


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized chunk by chunk straight into x's dtype, in the (out, in) layout
    ``F.linear`` reads as is; backward dx = dy @ W, dequantizing again (recomputed, never saved)."""

    @staticmethod
    def forward(ctx, x, spec, qweight, absmax, absmax2, offset):  # x: (N, in) in compute dtype
        ctx.spec = spec
        ctx.save_for_backward(qweight, absmax, absmax2, offset)
        scale = _absmax_fp32(spec, absmax, absmax2, offset)
        chunks = list(_row_chunks(spec))
        if len(chunks) == 1:
            return F.linear(x, _dequant_rows(spec, qweight, scale, 0, spec.shape[0], x.dtype))
        out = x.new_empty(x.shape[0], spec.shape[0])
        for r0, r1 in chunks:
            out[:, r0:r1] = F.linear(x, _dequant_rows(spec, qweight, scale, r0, r1, x.dtype))
        return out  # (N, out)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N, out)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        spec = ctx.spec
        qweight, absmax, absmax2, offset = ctx.saved_tensors
        scale = _absmax_fp32(spec, absmax, absmax2, offset)
        grad_out = grad_out.contiguous()
        grad_x = None
        for r0, r1 in _row_chunks(spec):
            w = _dequant_rows(spec, qweight, scale, r0, r1, grad_out.dtype)  # (rows, in)
            part = grad_out[:, r0:r1]
            grad_x = part @ w if grad_x is None else grad_x.addmm_(part, w)
        return grad_x, None, None, None, None, None


class QuantizedWeight:
    """What ``NF4Linear.weight`` returns: shape/dtype/device of the logical weight, never trainable.

    It is not a tensor; ``dequantize(dtype)`` gives the dense (out, in) weight. Asking it to require
    grad raises QuantError (train adapters on top instead, e.g. LoRA: that is QLoRA).
    """

    def __init__(self, layer: NF4Linear) -> None:
        self._layer = layer

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._layer.spec.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._layer.qweight.device

    @property
    def quant_type(self) -> str:
        return self._layer.spec.quant_type

    def numel(self) -> int:
        return self._layer.spec.numel

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._layer.dense_weight(dtype)

    @property
    def requires_grad(self) -> bool:
        return False

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    def requires_grad_(self, requires_grad: bool = True) -> QuantizedWeight:
        if requires_grad:
            raise QuantError(
                f"the {self.quant_type} weight {tuple(self.shape)} is frozen and cannot be trained; "
                "train an adapter on top (lorakit.inject) or dequantize the model first"
            )
        return self

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.quant_type}, shape={tuple(self.shape)}, device={self.device})"


class NF4Linear(nn.Module):
    """Frozen linear layer y = x W^T + b with W stored blockwise in NF4 (or FP4 / int8).

    Args:
        in_features, out_features: the logical weight is (out_features, in_features).
        bias: keep a (frozen) bias parameter.
        quant_type: "nf4" (default), "fp4" or "int8".
        blocksize: elements per absmax block (power of two dividing in*out; default 64).
        double_quant: store the absmax constants in 8 bits (blocks of ``double_quant_blocksize``).
        compute_dtype: dtype the weight is dequantized to for the matmul (default bf16); the output
            has the input's dtype.

    Buffers (all in state_dict, safetensors-serialisable): ``qweight`` (uint8 packed codes, int8 for
    int8), ``absmax`` (fp32, or uint8 codes with double quant), ``absmax2`` and ``absmax_offset``
    (fp32, double quant only). They are not parameters and never receive gradients; ``storage_as_parameters``
    re-registers them as frozen parameters (same names, same state_dict) for FSDP2 to shard.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        double_quant_blocksize: int = 256,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        spec = QuantSpec(
            (out_features, in_features), quant_type, blocksize, double_quant, double_quant_blocksize
        )
        check_spec(spec, f"linear ({out_features}x{in_features})")
        self.spec = spec
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        n, nb = spec.numel, spec.num_blocks
        int8 = quant_type == "int8"
        self.register_buffer(
            "qweight",
            torch.zeros(n if int8 else n // 2, dtype=torch.int8 if int8 else torch.uint8, device=device),
        )
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8, device=device))
            n2 = -(-nb // double_quant_blocksize)
            self.register_buffer("absmax2", torch.zeros(n2, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32, device=device))
            self.register_buffer("absmax2", None)
            self.register_buffer("absmax_offset", None)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "weight", **kwargs
    ) -> NF4Linear:
        """Quantize a dense (out, in) weight into a new layer (kwargs as in the constructor)."""
        if weight.dim() != 2:
            raise QuantError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        try:
            layer = cls(in_f, out_f, bias=bias is not None, device=weight.device, **kwargs)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        layer._store(weight)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, name: str = "linear", **kwargs) -> NF4Linear:
        """From an nn.Linear, or a GPT-2 Conv1D (whose stored (in, out) weight is transposed)."""
        from lorakit.weights import is_gpt2_conv1d

        weight = linear.weight.t() if is_gpt2_conv1d(linear) else linear.weight
        return cls.from_weight(weight, getattr(linear, "bias", None), name=name, **kwargs)

    @torch.no_grad()
    def _store(self, weight: torch.Tensor) -> None:
        spec = self.spec
        if tuple(weight.shape) != spec.shape:
            raise QuantError(f"weight shape {tuple(weight.shape)} != layer shape {spec.shape}")
        codes, absmax = quantize_blockwise(weight.detach(), spec.blocksize, spec.quant_type)
        dev = weight.device if self.qweight.is_meta else self.qweight.device  # meta: a loading shell
        self._set_storage("qweight", codes.to(dev))
        if spec.double_quant:
            q, absmax2, offset = double_quantize(absmax, spec.double_quant_blocksize)
            self._set_storage("absmax", q.to(dev))
            self._set_storage("absmax2", absmax2.to(dev))
            self._set_storage("absmax_offset", offset.to(dev))
        else:
            self._set_storage("absmax", absmax.to(dev))

    def _set_storage(self, name: str, value: torch.Tensor) -> None:
        """Replace one storage tensor, keeping how it is registered (buffer, or frozen parameter)."""
        if name in self._parameters:
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            setattr(self, name, value)

    def storage_as_parameters(self) -> NF4Linear:
        """Register ``qweight`` / ``absmax`` / ``absmax2`` as frozen ``nn.Parameter``s (requires_grad=False)
        instead of buffers, under the same names (state_dict keys unchanged), so FSDP2's ``fully_shard``
        shards them on dim 0 like the other frozen weights; its mixed-precision policy leaves non-float
        parameters uncast. Idempotent; the kernels read them the same way."""
        for name in SHARDABLE_STORAGE:
            t = self._buffers.get(name)
            if t is not None:
                del self._buffers[name]
                self._parameters[name] = nn.Parameter(t, requires_grad=False)
        return self

    # ---- the weight-access interface -----------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (out, in) weight in ``dtype`` (default ``compute_dtype``); a new tensor."""
        dtype = dtype or self.compute_dtype
        scale = _absmax_fp32(self.spec, self.absmax, self.absmax2, self.absmax_offset)
        return _dequant_rows(self.spec, self.qweight, scale, 0, self.out_features, dtype)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor, warn: bool = True) -> float:
        """Re-quantize from a dense (out, in) weight (e.g. a merged adapter). Lossy: returns the mean
        absolute error of the re-quantized weight against ``weight`` and warns with it if ``warn``."""
        self._store(weight)
        err = (
            (self.dense_weight(torch.float32) - weight.detach().float().to(self.qweight.device)).abs().mean()
        )
        err = float(err)
        if warn:
            warnings.warn(
                f"re-quantized a {tuple(weight.shape)} weight to {self.spec.quant_type}: mean abs error {err:.3g} "
                "(merge with dequantize=True to keep full precision)",
                stacklevel=2,
            )
        return err

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise QuantError(
                f"cannot assign .weight of a quantized {self.spec.quant_type} linear {self.spec.shape}; "
                "use set_dense_weight(w) to re-quantize"
            )
        super().__setattr__(name, value)

    def requires_grad_(self, requires_grad: bool = True) -> NF4Linear:
        if requires_grad:
            self.weight.requires_grad_(True)  # raises: the quantized weight is frozen
        return super().requires_grad_(requires_grad)

    # ---- compute --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.to(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias, with W dequantized to x's dtype chunk by chunk; autograd saves only
        the packed buffers (used by adapters that need the base's product on another input, e.g.
        DoRA's dropped input). x: (..., in) -> (..., out)."""
        if x.shape[-1] != self.in_features:
            raise QuantError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = _QuantMatmul.apply(x2, self.spec, self.qweight, self.absmax, self.absmax2, self.absmax_offset)
        return y.reshape(*lead, self.out_features)

    # Keep the fp32 scale buffers fp32 under model.to(dtype)/.half(): only device moves apply.
    def _apply(self, fn, recurse: bool = True):
        saved = {k: getattr(self, k) for k in _QUANT_BUFFERS if getattr(self, k) is not None}
        super()._apply(fn, recurse)
        for k, old in saved.items():
            new = getattr(self, k)
            if new.dtype != old.dtype:
                self._set_storage(k, old.to(new.device))
        return self

    # ---- accounting -------------------------------------------------------------------------------
    def weight_storage_bytes(self) -> int:
        """Bytes of the stored quantized weight (codes + all scale buffers; bias excluded)."""
        return sum(
            t.numel() * t.element_size() for k in _QUANT_BUFFERS if (t := getattr(self, k)) is not None
        )

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )
