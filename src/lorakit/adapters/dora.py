"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

Each adapted weight is split into a magnitude m (one value per output row) and a direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||_c,      m initialised to ||W0 + s B A||_c = ||W0||_c (B = 0)

where ||.||_c is the L2 norm of each output row of the canonical (out, in) weight and s the LoRA
scaling. The norm is treated as a constant in backward (paper section 4.3: ~24% less training memory,
same accuracy), so with scale = m / ||W0 + s B A||_c (detached norm) the layer output is

    y = scale * (x W0^T + s x A^T B^T) + b = base_out + (scale - 1) (base_out - b) + scale * s B A x.

With dropout active in training, lorakit follows PEFT 0.21 exactly: the dropped input x_d feeds both
the low-rank path and a recomputed base term, y = base_out + (scale - 1) x_d W0^T + scale * s B A x_d.

Cheaper than the reference: PEFT materialises the (d, k) matrix W0 + s B A in every forward to take its
row norms. Here ||W0 + s B A||^2 per row = ||W0||^2 (a cached constant of the frozen base)
+ 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B), built from (d, r) and (r, r) products
under no_grad. The output folds the rescaling into the low-rank matmul and one fused multiply-add
(``addcmul``), so DoRA costs about one elementwise pass more than LoRA in backward.

At decode the norm is a constant: outside grad-enabled training (eval, no_grad, inference_mode) it is
computed once and cached until A, B, m, the scaling or any tensor of the base (dense weight, or an NF4
layer's packed codes and scales) changes, in place (``_version``) or by replacement (identity of the
tensor and of its storage), or the mode is switched. Training with gradients recomputes it every
forward, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import adapter_input, copy_peft_state
from lorakit.adapters.lora import LORA_INITS, LoraLinear, lora_from_peft, lora_to_peft
from lorakit.adapters.loraplus import LORAPLUS_OPTIONS, loraplus_groups, validate_loraplus
from lorakit.config import AdapterConfig
from lorakit.errors import AdapterStateError
from lorakit.methods import Method, PeftCodec, json_field, register
from lorakit.weights import WeightAccess

# Below this ratio ||W0 + sBA||^2 / ||W0||^2 the expanded formula loses too many digits to cancellation
# (fp32: ~1e-7 / ratio relative error), and the rows' norms are taken directly from the dense sum.
_CANCELLATION_RATIO = 1e-3
# A row of W0 + sBA that is all zeros (e.g. pruned) gets this norm instead of 0, so m / norm stays finite.
_MIN_NORM = 1e-12


def _stamp_meta(t: torch.Tensor) -> tuple:
    return (t.storage_offset(), t.shape, t.stride(), t.dtype, t.device, t._version)


class _Stamp:
    """What one tensor held when a cached value was computed from it.

    Identity is held by weak references to the tensor and to its storage: while the storage is alive no
    other storage can take its place, and once it is freed the reference is dead, so memory handed out
    again at the same address (same ``data_ptr``, same ``_version``) never matches. In-place writes bump
    ``_version``; ``.data = ...`` swaps the storage. Writes that bypass the version counter (through
    ``.data``, or an alias built over the same memory) are not seen: call ``invalidate_cache()``.
    """

    __slots__ = ("tensor", "storage", "meta")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = weakref.ref(t)
        self.storage = weakref.ref(t.untyped_storage())
        self.meta = _stamp_meta(t)

    def matches(self, t: torch.Tensor) -> bool:
        return self.tensor() is t and self.storage() is t.untyped_storage() and self.meta == _stamp_meta(t)


class _Cached:
    """One cached tensor and the stamps of the tensors (plus plain values) it was computed from.

    Not part of the adapter's state: a deep copy or an unpickled adapter starts empty (the stamps refer
    to the original's tensors and could not match the copy's anyway).
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.stamps: tuple[_Stamp, ...] = ()
        self.extra: tuple = ()

    def get(self, tensors: list[torch.Tensor], extra: tuple) -> torch.Tensor | None:
        v = self.value
        if v is None or extra != self.extra or len(tensors) != len(self.stamps):
            return None
        if v.is_inference() and not torch.is_inference_mode_enabled():
            return None  # made under inference_mode: autograd could not save it for backward
        if all(s.matches(t) for s, t in zip(self.stamps, tensors)):
            return v
        return None

    def put(self, value: torch.Tensor, tensors: list[torch.Tensor], extra: tuple) -> torch.Tensor:
        try:
            stamps = tuple(_Stamp(t) for t in tensors)
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without a storage
            self.clear()
            return value
        self.value, self.stamps, self.extra = value, stamps, extra
        return value

    def clear(self) -> None:
        self.value, self.stamps, self.extra = None, (), ()

    def __deepcopy__(self, memo: dict) -> _Cached:
        return _Cached()

    def __reduce__(self):
        return (_Cached, ())


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class DoraLinear(LoraLinear):
    """DoRA on a linear map (nn.Linear, GPT-2 Conv1D, or a quantized linear such as NF4: QDoRA).

    The LoRA factors (``lora_A``, ``lora_B``, ``scaling``, ``dropout``) are those of ``LoraLinear``;
    DoRA adds ``lora_magnitude_vector`` (out_features,), PEFT's name for m. Arguments as LoraLinear.
    Call :meth:`init_magnitude` with the base's weight access once the factors are set.
    """

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
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, init, dtype, device)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(out_features, dtype=dtype, device=device)
        )  # (d,)
        self._base_sq = _Cached()  # ||W0||^2 per row, fp32 (d,), keyed by the base's tensors
        self._norm = _Cached()  # ||W0 + sBA||_c outside grad-enabled training, keyed by A, B, m, s, base
        self._merge_norm: torch.Tensor | None = None  # ||W + sBA||_c used by the last merge, for unmerge

    # ---- the row norm ||W0 + s B A||_c ----

    def _base_row_sq(self, access: WeightAccess, w: torch.Tensor) -> torch.Tensor:
        tensors = _module_tensors(access.module)
        base_sq = self._base_sq.get(tensors, (access.fan_in_fan_out,))
        if base_sq is None:
            base_sq = self._base_sq.put(w.float().square().sum(1), tensors, (access.fan_in_fan_out,))
        return base_sq

    def _row_norm(self, access: WeightAccess) -> torch.Tensor:
        """The (d,) norm for forward. Training with gradients recomputes it every call (the factors move
        every step); otherwise (eval, no_grad, inference) it is a constant, cached until any of A, B, m,
        the scaling or the base's tensors change (in place or replaced) or the mode is switched."""
        if self.training and torch.is_grad_enabled():
            return self.weight_norm(access)
        own = [self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector]
        tensors = own + _module_tensors(access.module)
        extra = (self.scaling, access.fan_in_fan_out)
        norm = self._norm.get(tensors, extra)
        if norm is None:
            norm = self._norm.put(self.weight_norm(access), tensors, extra)
        return norm

    def invalidate_cache(self) -> None:
        """Forget the cached norms (done automatically when the tensors they were computed from change;
        needed only after writes that bypass the version counter, such as ``p.data.add_(...)``)."""
        self._base_sq.clear()
        self._norm.clear()

    def train(self, mode: bool = True) -> DoraLinear:
        """Switching mode starts the caches afresh: what a training phase wrote, even through ``.data``,
        is never served from a norm cached before it."""
        self.invalidate_cache()
        return super().train(mode)

    @torch.no_grad()
    def weight_norm(self, access: WeightAccess, w: torch.Tensor | None = None) -> torch.Tensor:
        """||W0 + s B A||_c per output row, fp32 (d,), without forming the (d, k) sum.

        ``w`` is the base's canonical fp32 weight if the caller already has it.
        """
        if w is None:
            w = access.dense_weight(torch.float32)
        w = w.float()
        a, b, s = self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling  # (r, k), (d, r)
        base_sq = self._base_row_sq(access, w)  # (d,)
        # rowsum((W0 + sBA)^2) - ||W0||^2 = rowsum(B * (2s W0 A^T + s^2 B A A^T)): (d, r) and (r, r) products only
        t = torch.addmm(w @ a.t(), b, a @ a.t(), beta=2.0 * s, alpha=s * s)  # (d, r)
        sq = base_sq + torch.linalg.vecdot(t, b)  # (d,)
        if bool((sq < _CANCELLATION_RATIO * base_sq).any()):
            return torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=s), dim=1).clamp_min_(_MIN_NORM)
        return sq.sqrt_().clamp_min_(_MIN_NORM)

    @torch.no_grad()
    def init_magnitude(self, access: WeightAccess) -> None:
        """m = ||W0 + s B A||_c (= ||W0||_c while B = 0), so the adapted layer starts equal to the base."""
        self.lora_magnitude_vector.copy_(self.weight_norm(access))

    # ---- forward ----

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, k), (d, r)
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        x = adapter_input(x, a.dtype, cast=dropping)  # the dropout path multiplies x by W0 itself
        norm = self._row_norm(access)  # (d,), no_grad: the paper's detached norm
        scale = self.lora_magnitude_vector / norm  # (d,), gradient reaches m
        b_scaled = b * (scale * self.scaling).unsqueeze(1)  # scale * s * B: (d, r)
        if dropping:
            # PEFT: the base term is recomputed from the dropped input, without the bias.
            xd = self.dropout(x)  # (..., k)
            lora = F.linear(F.linear(xd, a), b_scaled)  # scale * s * B A x_d: (..., d)
            # x_d W0^T through the access: autograd saves no dense fp32 copy of an NF4 or bf16 W0
            y = torch.addcmul(base_out + lora, access.matmul(xd), scale - 1)
        else:
            # y = scale * base_out + (1 - scale) * b + scale * s * B A x; the bias term rides in the matmul.
            bias = access.bias
            shift = None if bias is None else bias.to(scale.dtype) * (1 - scale)  # (d,)
            y = torch.addcmul(F.linear(F.linear(x, a), b_scaled, shift), base_out, scale)
        return y.to(base_out.dtype)

    # ---- dense form, merge, unmerge ----

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        """W' - W0 = (m / ||W0 + sBA||_c) (W0 + sBA) - W0, canonical layout, fp32."""
        w = access.dense_weight(torch.float32)
        v = w + super().delta_weight(access).float()
        return (self.lora_magnitude_vector.float() / torch.linalg.vector_norm(v.detach(), dim=1)).unsqueeze(
            1
        ) * v - w

    @torch.no_grad()
    def merge_weight(self, access: WeightAccess, w: torch.Tensor) -> torch.Tensor:
        """W' = (m / ||w + sBA||_c) (w + sBA); the (d,) norm is kept so that unmerge can invert it."""
        v = w.float() + super().delta_weight(access).float()
        norm = torch.linalg.vector_norm(v, dim=1)  # exact, once per merge
        self._merge_norm = norm
        self.invalidate_cache()
        return (self.lora_magnitude_vector.float() / norm).unsqueeze(1) * v

    @torch.no_grad()
    def unmerge_weight(self, access: WeightAccess, w: torch.Tensor) -> torch.Tensor:
        """w = W' / (m / norm) - sBA, with the norm cached by the last merge (no (d, k) storage)."""
        if self._merge_norm is None:
            raise AdapterStateError("DoRA unmerge: this adapter has no recorded merge to undo")
        factor = self.lora_magnitude_vector.float() / self._merge_norm  # (d,)
        if not bool((factor != 0).all()):
            raise AdapterStateError(
                "DoRA unmerge: a magnitude is zero, so the merged weight cannot be inverted"
            )
        restored = w.float() / factor.unsqueeze(1) - super().delta_weight(access).float()
        self._merge_norm = None
        self.invalidate_cache()
        return restored

    # ---- PEFT-compatible state ----

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        copy_peft_state("dora", self.peft_state(), state)


def _build_dora(access: WeightAccess, cfg: AdapterConfig, module_name: str) -> nn.Module:
    """DoRA adapter for one linear base module; the magnitude starts at the base's row norms."""
    r, alpha = cfg.rank_for(module_name), cfg.alpha_for(module_name)
    adapter = DoraLinear(
        access.in_features,
        access.out_features,
        r,
        alpha,
        cfg.dropout,
        cfg.use_rslora,
        cfg.init,
        device=access.device,
    )
    adapter.init_magnitude(access)
    return adapter


def _dora_to_peft(cfg: AdapterConfig, adapters: Mapping[str, nn.Module]) -> dict[str, Any]:
    return {**lora_to_peft(cfg, adapters), "use_dora": True}


def _is_dora(d: Mapping[str, Any]) -> bool:
    """PEFT writes DoRA as a "LORA" adapter with ``use_dora`` true."""
    return bool(json_field(d, "use_dora", bool, False))


DORA = register(
    Method(
        "dora",
        _build_dora,
        kinds=("linear",),
        peft=PeftCodec("LORA", _dora_to_peft, lora_from_peft, claims=_is_dora, rank_keys=("lora_A.weight",)),
        inits=LORA_INITS,
        options=LORAPLUS_OPTIONS,
        optimizer=loraplus_groups,
        validate=validate_loraplus,
        doc="DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024)",
    )
)
# The checked builder (a layer kind DoRA does not adapt is a ConfigError naming the module).
build_dora = DORA.build
