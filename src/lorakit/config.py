"""Frozen configuration dataclasses for adapters and quantization, with validation.

Every error names the field, the bad value and what is allowed (STYLE.md rule 5). Configs are turned
into flat layer arguments by one builder per method (see ``lorakit.adapters.registry``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

METHODS = ("lora", "dora", "adalora")
INITS = ("default", "gaussian", "pissa")
BIAS = ("none",)
QUANT_DTYPES = ("nf4", "fp4", "int8")

TargetSpec = Union[str, Sequence[str], None]


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what was expected."""


def _closest(name: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_choice(field_name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{field_name}={value!r} is not supported; expected one of {list(allowed)}"
            + (_closest(str(value), allowed) if isinstance(value, str) else "")
        )


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field_name}: regex {pattern!r} does not compile: {e}") from None


def _as_tuple(value: TargetSpec) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


@dataclass(frozen=True)
class AdapterConfig:
    """What to adapt and how.

    Args:
        method: "lora" (Hu et al. 2021), "dora" (Liu et al. 2024) or "adalora" (Zhang et al. 2023).
        r: rank of the update (for AdaLoRA, the final average rank ``target_r`` is used instead).
        alpha: scaling numerator; the update is scaled by alpha/r (alpha/sqrt(r) with ``use_rslora``).
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: a list (exact module name or dotted-suffix match), a string (full regex
            match over the module name), "all-linear" (every Linear/Conv1D except the output head)
            or None (the model's attention query and value projections, found by name).
        exclude_modules: same forms as ``target_modules``; matched modules are never adapted.
        layers_to_transform: only adapt modules inside these layer indices (``layers.N``/``h.N``).
        layers_pattern: the name of the layer container (e.g. "layers"); default: any of the usual.
        rank_pattern / alpha_pattern: regex (full match on the module name, or on its suffix) ->
            rank / alpha overriding ``r`` / ``alpha`` for matched modules.
        modules_to_save: module names (suffix match) trained in full and saved with the adapter,
            e.g. a classifier head.
        use_rslora: rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).
        init: "default" (A Kaiming-uniform a=sqrt(5), B = 0), "gaussian" (A ~ N(0, 1/r), B = 0) or
            "pissa" (principal singular vectors of W, the residual kept in the base weight).
        bias: only "none" (biases stay frozen).
        init_r, target_r, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight, total_step: AdaLoRA
            (see ``lorakit.adapters.adalora``).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    init: str = "default"
    bias: str = "none"
    # AdaLoRA
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_tuple(self.exclude_modules))
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, int):
                layers = (layers,)
            object.__setattr__(self, "layers_to_transform", tuple(int(i) for i in layers))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        self.validate()

    def validate(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("init", self.init, INITS)
        _check_choice("bias", self.bias, BIAS)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} is invalid; expected a positive integer (e.g. 8)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha!r} is invalid; expected a positive number (e.g. 16)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} is invalid; expected a number in [0, 1)")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if isinstance(spec, str) and spec != "all-linear":
                _check_regex(name, spec)
            elif isinstance(spec, tuple):
                if not spec:
                    raise ConfigError(f"{name} is an empty list; give module names, a regex or 'all-linear'")
                for item in spec:
                    if not isinstance(item, str) or not item:
                        raise ConfigError(f"{name} entries must be non-empty strings, got {item!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                _check_regex(f"{name}[{key!r}]", key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ConfigError(f"{name}[{key!r}]={value!r} is invalid; expected a positive number")
                if name == "rank_pattern" and int(value) != value:
                    raise ConfigError(f"{name}[{key!r}]={value!r} is invalid; expected a positive integer")
        if self.layers_to_transform is not None and any(i < 0 for i in self.layers_to_transform):
            raise ConfigError(f"layers_to_transform={self.layers_to_transform} must hold non-negative indices")
        if self.method == "adalora":
            self._validate_adalora()
        elif self.init == "pissa" and self.method != "lora":
            raise ConfigError(f"init='pissa' is only supported with method='lora', not {self.method!r}")

    def _validate_adalora(self) -> None:
        for name in ("init_r", "target_r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} is invalid; expected a positive integer")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}; AdaLoRA only prunes ranks"
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"{name}={v!r} is invalid; expected a number strictly between 0 and 1")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} is invalid; expected a non-negative integer")
        if not isinstance(self.delta_t, int) or self.delta_t <= 0:
            raise ConfigError(f"delta_t={self.delta_t!r} is invalid; expected a positive integer")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} must be >= 0")
        if self.total_step is not None and self.total_step <= self.tinit + self.tfinal:
            raise ConfigError(
                f"total_step={self.total_step} is too small: it must exceed tinit + tfinal "
                f"= {self.tinit} + {self.tfinal} so the budget has steps to shrink over"
            )
        if self.init != "default":
            raise ConfigError(f"init={self.init!r} cannot be combined with method='adalora'")
        if self.use_rslora:
            raise ConfigError("use_rslora cannot be combined with method='adalora' (it scales by alpha/ranknum)")

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys are an error naming the closest."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"adapter: unknown key {key!r}{_closest(key, names)}; allowed: {names}")
        return cls(**dict(data))

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT semantics: a key matches the full name or a dotted suffix of it (PEFT appends ``$``)."""
    for key, value in pattern.items():
        if re.fullmatch(key, module_name) or re.search(rf"(^|\.){key}$", module_name):
            return value
    return default


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def parse_dtype(field_name: str, value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ConfigError(f"{field_name}={value} is not supported; expected bfloat16, float16 or float32")
        return value
    if value not in _DTYPES:
        raise ConfigError(f"{field_name}={value!r} is not supported; expected one of {sorted(_DTYPES)}")
    return _DTYPES[value]


@dataclass(frozen=True)
class QuantConfig:
    """How to store frozen base Linear weights in low precision (QLoRA, Dettmers et al. 2023).

    Args:
        dtype: "nf4" (4-bit NormalFloat), "fp4" or "int8".
        blocksize: elements per absmax block (a power of two, default 64 as in the paper).
        double_quant: quantize the absmax constants again to 8 bits (blocks of ``double_quant_blocksize``).
        double_quant_blocksize: block size of the second quantization (default 256).
        compute_dtype: dtype the weight is dequantized to for the matmul (bf16 default).
        skip: module names (suffix match) or the output head that stay in full precision.
    """

    dtype: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    double_quant_blocksize: int = 256
    compute_dtype: torch.dtype = torch.bfloat16
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_dtype", parse_dtype("compute_dtype", self.compute_dtype))
        object.__setattr__(self, "skip", tuple(self.skip or ()))
        _check_choice("dtype", self.dtype, QUANT_DTYPES)
        for name in ("blocksize", "double_quant_blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v & (v - 1):
                raise ConfigError(f"{name}={v!r} is invalid; expected a power of two >= 2 (e.g. 64)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_dtype"] = str(self.compute_dtype).replace("torch.", "")
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"quant: unknown key {key!r}{_closest(key, names)}; allowed: {names}")
        return cls(**dict(data))
