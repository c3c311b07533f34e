"""Frozen configuration dataclasses for adapters and quantization, with validation.

Every error names the field, the bad value and what is allowed (STYLE.md rule 5); the field checks
themselves (choices, integers, numbers, dtypes) are ``lorakit.validation``'s. Which methods exist, their
own fields and the rules between fields are in the method registry (``lorakit.methods``, one layer
below), which ``AdapterConfig.validate`` asks; each method's builder (in its file under
``lorakit/adapters/``) turns a config into the flat arguments of one adapter layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from lorakit import methods
from lorakit.errors import ConfigError, did_you_mean, show  # re-exported: their usual home for callers
from lorakit.validation import (  # the field checks; INT_LIMIT, check_int, parse_dtype re-exported
    INT_LIMIT,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_regex,
    finite_number,
    parse_dtype,
)

BIAS = ("none",)
QUANT_DTYPES = ("nf4", "fp4", "int8")

TargetSpec = Union[str, Sequence[str], None]


def __getattr__(name: str) -> Any:
    """``METHODS`` and ``INITS``, kept for one release: the registered method names and the init values
    they accept, read from the method registry (``lorakit.methods.names()`` / ``inits()``)."""
    if name in ("METHODS", "INITS"):
        return methods.names() if name == "METHODS" else methods.inits()
    raise AttributeError(f"module 'lorakit.config' has no attribute {name!r}")


def _check_names(field_name: str, value: Any) -> None:
    """A list of non-empty strings, or None (a bare string would be read as its characters)."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field_name}={show(value)} is invalid; expected a list of non-empty names")


def _check_targets(field_name: str, spec: Any) -> None:
    if spec is None or spec == "all-linear":
        return
    if isinstance(spec, str):
        if not spec:
            raise ConfigError(f"{field_name} is an empty string; give module names, a regex or 'all-linear'")
        check_regex(field_name, spec)
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{field_name} is an empty list; give module names, a regex or 'all-linear'")
        for item in spec:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{field_name} entries must be non-empty strings, got {show(item)}")
    else:
        raise ConfigError(
            f"{field_name}={show(spec)} has the wrong type; expected a list of module names, a regex, "
            "'all-linear' or null"
        )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no module name can hold it
        return False
    return True


def _check_pattern(field_name: str, pattern: Any, integral: bool) -> None:
    """rank_pattern / alpha_pattern: regex -> positive number (a whole number for ranks)."""
    if pattern is None:
        return
    if not isinstance(pattern, Mapping):
        raise ConfigError(
            f"{field_name}={show(pattern)} has the wrong type; expected a mapping regex -> value"
        )
    for key, value in pattern.items():
        check_regex(f"{field_name}[{show(key)}]", key)
        f = finite_number(value)
        if f is None or f <= 0 or (integral and (f != int(f) or f >= INT_LIMIT)):
            what = "a positive integer" if integral else "a positive number"
            raise ConfigError(f"{field_name}[{show(key)}]={show(value)} is invalid; expected {what}")


def _check_layers(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError("layers_to_transform is an empty list; give layer indices or null")
        for i, layer in enumerate(value):
            check_int(f"layers_to_transform[{i}]", layer, minimum=0)
    else:
        check_int("layers_to_transform", value, minimum=0)


def _check_options(value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(
            f"method_options={show(value)} has the wrong type; expected a mapping of option name -> value"
        )


def _check_steps(field_name: str, value: Any, minimum: int) -> None:
    """A step count (int >= minimum) or a fraction of the total steps (a float strictly in (0, 1); 0.0 is
    read as 0 steps where 0 is allowed). A float >= 1 is refused: 1.0 could mean all steps or one step."""
    if isinstance(value, float) and not isinstance(value, bool):
        if 0.0 < value < 1.0 or (value == 0.0 and minimum == 0):
            return
        raise ConfigError(
            f"{field_name}={show(value)} is invalid; a float is a fraction of the total steps and must be in "
            f"(0, 1); write a step count as an integer (e.g. {field_name}={max(minimum, 10)})"
        )
    check_int(field_name, value, minimum=minimum)


def _as_tuple(value: TargetSpec) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


@dataclass(frozen=True)
class AdapterConfig:
    """What to adapt and how.

    Args:
        method: a registered method (``lorakit.methods.names()``): "lora" (Hu et al. 2021), "dora"
            (Liu et al. 2024), "adalora" (Zhang et al. 2023), or one registered elsewhere.
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
        init: an initialisation the method accepts (its registry entry's ``inits``); LoRA's:
            "default" (A Kaiming-uniform a=sqrt(5), B = 0), "gaussian" (A ~ N(0, 1/r), B = 0),
            "pissa" (principal singular vectors of W; trains on the residual, W itself unchanged), "olora"
            (QR of W, likewise) or "loftq" (s B A fits a quantized base's error W - Q(W));
            ``lorakit.adapters.lora_init``. AdaLoRA's: "default" = "gaussian" (P, Q ~ N(0, 0.02), PEFT's)
            or "orthogonal" (P, Q orthonormal); λ = 0 under both (``lorakit.adapters.adalora_setup``).
        bias: only "none" (biases stay frozen).
        init_r, target_r, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight, total_step: AdaLoRA
            (see ``lorakit.adapters.adalora``; top-level fields from before the registry). ``tinit``,
            ``tfinal``, ``delta_t``: an integer is a step count, a float in (0, 1) a fraction of the total
            steps (resolved once the trainer knows them); defaults 0.1 / 0.4 / 0.01 (warm up 10%, prune,
            fine-tune the last 40% at the final ranks, mask every 1%: see ``adalora_budget``). AdaLoRA's
            ``method_options``: ``orth_form`` ("squared" | "peft") and ``lambda_lr_ratio`` (λ's rate /
            ``training.lr``, default 1).
        method_options: the method's own fields (name -> value), as its registry entry declares them
            (``Option``); unknown names and bad values are errors. Read them with :meth:`option`.
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
    tinit: int | float = 0.1
    tfinal: int | float = 0.4
    delta_t: int | float = 0.01
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Shapes first: normalising a wrong type (tuple("abc"), dict(5), ...) would hide or crash on it.
        for name in ("target_modules", "exclude_modules"):
            _check_targets(name, getattr(self, name))
        _check_layers(self.layers_to_transform)
        _check_names("modules_to_save", self.modules_to_save)
        _check_pattern("rank_pattern", self.rank_pattern, integral=True)
        _check_pattern("alpha_pattern", self.alpha_pattern, integral=False)
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_tuple(self.exclude_modules))
        layers = self.layers_to_transform
        if layers is not None:
            object.__setattr__(
                self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers)
            )
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        _check_options(self.method_options)
        object.__setattr__(self, "method_options", dict(self.method_options or {}))
        self.validate()

    def validate(self) -> None:
        """Every field is checked whatever the method (a wrong value in an unused field is still a typo);
        the rules between fields, the init and ``method_options`` are checked by the method's registry
        entry (``lorakit.methods.Method.check``)."""
        method = methods.get(self.method)
        check_choice("init", self.init, methods.inits())
        check_choice("bias", self.bias, BIAS)
        check_int("r", self.r, example="8")
        check_number("alpha", self.alpha, lambda a: a > 0, "a positive number (e.g. 16)")
        check_number("dropout", self.dropout, lambda p: 0.0 <= p < 1.0, "a number in [0, 1)")
        for name in ("target_modules", "exclude_modules"):
            _check_targets(name, getattr(self, name))
        _check_pattern("rank_pattern", self.rank_pattern, integral=True)
        _check_pattern("alpha_pattern", self.alpha_pattern, integral=False)
        _check_layers(self.layers_to_transform)
        lp = self.layers_pattern
        if lp is not None and (not isinstance(lp, str) or not lp.strip() or "\x00" in lp or not _encodable(lp)):
            raise ConfigError(
                f"layers_pattern={show(self.layers_pattern)} is invalid; expected a layer container name "
                "(e.g. 'layers') or null"
            )
        _check_names("modules_to_save", self.modules_to_save)
        check_bool("use_rslora", self.use_rslora)
        for name in ("init_r", "target_r"):
            check_int(name, getattr(self, name))
        for name in ("tinit", "tfinal", "delta_t"):
            _check_steps(name, getattr(self, name), minimum=1 if name == "delta_t" else 0)
        check_int("total_step", self.total_step, optional=True)
        for name in ("beta1", "beta2"):
            check_number(
                name, getattr(self, name), lambda b: 0.0 < b < 1.0, "a number strictly between 0 and 1"
            )
        check_number("orth_reg_weight", self.orth_reg_weight, lambda w: w >= 0, "a number >= 0")
        _check_options(self.method_options)
        method.check(self)

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
                raise ConfigError(f"adapter: unknown key {show(key)}{did_you_mean(key, names)}; allowed: {names}")
        return cls(**dict(data))

    def option(self, name: str) -> Any:
        """The method's own field ``name``: ``method_options[name]``, else its declared default."""
        declared = methods.get(self.method).options
        if name not in declared:
            raise ConfigError(
                f"method={self.method!r} has no option {show(name)}{did_you_mean(name, list(declared))}; "
                f"it declares {list(declared)}"
            )
        return self.method_options.get(name, declared[name].default)

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
        _check_names("skip", self.skip)
        object.__setattr__(self, "skip", tuple(self.skip or ()))
        check_choice("dtype", self.dtype, QUANT_DTYPES)
        check_bool("double_quant", self.double_quant)
        for name in ("blocksize", "double_quant_blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v < INT_LIMIT or v & (v - 1):
                raise ConfigError(f"{name}={show(v)} is invalid; expected a power of two >= 2 (e.g. 64)")

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
                raise ConfigError(f"quant: unknown key {show(key)}{did_you_mean(key, names)}; allowed: {names}")
        return cls(**dict(data))
