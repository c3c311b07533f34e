"""The method registry: one entry per adapter method, written in the method's own file.

An entry (:class:`Method`) holds all lorakit knows about a method: the builder of its adapter for one
base module, the layer kinds it adapts, the config fields of its own (``AdapterConfig.method_options``)
and the rules between fields, the initialisations that ride on it (``AdapterConfig.init``: PiSSA, OLoRA
and LoftQ are LoRA's), its trainer callbacks, its PEFT file format, and the optimizer settings that ride
on it (LoRA+: lora's and dora's ``method_options.loraplus_lr_ratio``). Config validation, target matching, the
adapter files, the trainer's method callbacks, the planner, the quickstart and the CLI's ``--method``
choices ask this registry::

    register(Method("lora", build_lora, kinds=("linear", "embedding", "conv"), peft=..., inits=...))

The built-in methods (``lorakit/adapters/lora.py``, ``dora.py``, ``adalora.py``) register when
``lorakit.adapters`` is imported, which ``import lorakit`` does. A method defined anywhere else registers
the same way and ``unregister(name)`` takes it out again.

Two training setups carry method-like names but are not adapter methods: "qlora" (LoRA on an
NF4-quantized frozen base) and "full" (every weight trains, no adapter). They are defined here, once,
in :data:`VARIANTS`; :func:`setups` lists them with the methods for the planner and the recipes.

This module sits at the bottom, below ``lorakit.config`` (whose validation asks it): it imports only
``lorakit.errors``; configs reach it as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError, did_you_mean, show

if TYPE_CHECKING:
    from torch import nn

    from lorakit.config import AdapterConfig
    from lorakit.weights import WeightAccess

# Layer kinds an adapter can sit on (``WeightAccess.kind``), and what each covers, for error messages.
KINDS = {
    "linear": "nn.Linear, GPT-2 Conv1D, quantized linears",
    "embedding": "nn.Embedding",
    "conv": "nn.Conv1d, nn.Conv2d",
}

# PEFT's tensor keys are this prefix + module path + the adapter's own name (``lora_A.weight``).
PEFT_PREFIX = "base_model.model."

# builder(access, cfg, module_name) -> the adapter module for one base module (see adapters/base.py)
Builder = Callable[["WeightAccess", "AdapterConfig", str], "nn.Module"]
# factory(model, adapter_name, cfg) -> the trainer callbacks the method needs (AdaLoRA's budget)
CallbackFactory = Callable[["nn.Module", str, "AdapterConfig"], list]
# groups(model, cfg, lr, weight_decay) -> optimizer param groups, or None for the plain ones (LoRA+)
OptimizerGroups = Callable[["nn.Module", "AdapterConfig", float, float], "list[dict[str, Any]] | None"]


@dataclass(frozen=True)
class Option:
    """A config field a method declares for itself: ``AdapterConfig(method_options={name: value})``.

    ``check(field_name, value)`` raises a ConfigError naming ``field_name`` when the value is wrong.
    ``AdapterConfig.option(name)`` returns the value, or ``default`` when it is not given."""

    default: Any
    check: Callable[[str, Any], None] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Init:
    """An initialisation that rides on a method (``AdapterConfig.init``); ``peft_value`` is what PEFT's
    ``init_lora_weights`` holds for it in adapter_config.json. The method's builder carries it out.

    ``changes_base``: the init moves part of the base weight into the adapter (PiSSA, OLoRA): training
    runs on the residual W - s B0 A0. (PEFT writes the residual into the base weight; lorakit leaves the
    weight alone and the adapter subtracts s B0 A0 x itself, so disabling, deleting or unloading the
    adapter gives the real base.) Such an adapter is saved converted, as PEFT's
    ``path_initial_model_for_weight_conversion`` does: a rank-2r LoRA with ``init_lora_weights: true``
    that is right on the unchanged base (``lorakit.io.conversion``).

    ``reads_full_precision``: the init fits the adapter to the error of a quantized base (LoftQ), so it
    needs the weights as they were before quantization; the trainer keeps them for it (and a run config
    with such an init needs a quant section).

    ``reads_inputs``: the init is computed from the layers' inputs on calibration rows (CorDA): the trainer
    runs training rows through the base before injecting; a PEFT file saved with such an init unconverted
    is only right on PEFT's residual model, which the file alone cannot rebuild, so it is refused.

    ``options``: the method's ``method_options`` keys that only this init reads (CorDA's mode): set with
    another init they would be ignored, so the config is refused; a converted file's config drops them."""

    peft_value: bool | str
    doc: str = ""
    changes_base: bool = False
    reads_full_precision: bool = False
    reads_inputs: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeftCodec:
    """How a method's adapters are written in PEFT's format, on top of the fields every LoRA-family
    ``peft_type`` shares (r, lora_alpha, target_modules, ...; ``lorakit.io.peft_format`` writes those).

    Tensors: each adapter module's ``peft_state()`` names them relative to its module path
    (``lora_A.weight``, ``lora_E``, ...) and ``load_peft_state(state, **layer_kwargs)`` reads them back.

    Args:
        peft_type: adapter_config.json's ``peft_type`` ("LORA", "ADALORA", ...); methods may share one.
        to_peft: ``(cfg, adapters) -> json fields`` of the method's own; ``adapters`` maps module path
            -> this adapter's module in each adapted layer.
        from_peft: ``(json) -> AdapterConfig fields`` of the method's own (read with :func:`json_field`),
            ``r`` included: the shared fields io reads leave it out, as its meaning differs (AdaLoRA's
            json ``r`` is ignored; its rank is ``target_r``).
        claims: for methods sharing a ``peft_type``: does this json belong to this method (DoRA:
            ``use_dora`` is true)? The method without ``claims`` takes the rest.
        json_names: lorakit field -> the json field it is read from, so a config error names what the
            file says (AdaLoRA: ``delta_t`` -> ``deltaT``).
        rank_keys: the tensors whose first dimension is a layer's rank, so a file's ranks are checked
            against its config before anything is allocated (empty: ``load_peft_state`` checks).
        file_rank: ``(cfg, module_path, layer_kwargs) -> (rank, why)`` the file stores for a module;
            default ``cfg.rank_for(path)`` ("r / rank_pattern").
        layer_kwargs: ``(json) -> {module path: kwargs}`` passed to ``load_peft_state``.
        layer_field: the json field ``layer_kwargs`` reads (for errors naming a module not adapted).
    """

    peft_type: str
    to_peft: Callable[[AdapterConfig, Mapping[str, nn.Module]], dict[str, Any]]
    from_peft: Callable[[Mapping[str, Any]], dict[str, Any]]
    claims: Callable[[Mapping[str, Any]], bool] | None = None
    json_names: Mapping[str, str] = field(default_factory=dict)
    rank_keys: tuple[str, ...] = ()
    file_rank: Callable[[AdapterConfig, str, Mapping[str, Any]], tuple[int, str]] | None = None
    layer_kwargs: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None
    layer_field: str = ""

    def stored_rank(self, cfg: AdapterConfig, path: str, kwargs: Mapping[str, Any]) -> tuple[int, str]:
        if self.file_rank is not None:
            return self.file_rank(cfg, path, kwargs)
        return cfg.rank_for(path), "r / rank_pattern"


@dataclass(frozen=True)
class Method:
    """One adapter method (see the module docstring).

    Args:
        name: ``AdapterConfig.method``.
        builder: ``(access, cfg, module_name) -> adapter module`` with flat arguments from the config
            (STYLE.md rule 5); call :meth:`build`, which checks the layer kind first.
        kinds: layer kinds it adapts (keys of :data:`KINDS`).
        peft: its PEFT file format (None: its adapters cannot be saved).
        options: config fields of its own, set through ``AdapterConfig.method_options``.
        inits: ``AdapterConfig.init`` values it accepts.
        validate: ``(cfg) -> None``, the rules between fields (raise ConfigError naming the field).
        callbacks: trainer callbacks the method needs (the trainer imports no method).
        optimizer: optimizer settings that ride on the method (LoRA+: B's learning rate a multiple
            of A's); ``(model, cfg, lr, weight_decay) -> param groups``, or None when ``cfg`` asks for
            nothing special (the trainer then uses its plain groups; ``train.build.optimizer_groups``).
        doc: one line with the paper, for listings.
    """

    name: str
    builder: Builder
    kinds: tuple[str, ...] = ("linear",)
    peft: PeftCodec | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    inits: Mapping[str, Init] = field(default_factory=lambda: {"default": Init(True)})
    validate: Callable[[AdapterConfig], None] | None = None
    callbacks: CallbackFactory | None = None
    optimizer: OptimizerGroups | None = None
    doc: str = ""

    def build(self, access: WeightAccess, cfg: AdapterConfig, module_name: str) -> nn.Module:
        """The adapter for one base module; a layer kind the method does not adapt is a ConfigError."""
        if access.kind not in self.kinds:
            raise ConfigError(self.kind_error(module_name, access.kind))
        return self.builder(access, cfg, module_name)

    def kind_error(self, module_name: str, kind: str | None, type_name: str = "") -> str:
        """The one-line error for a module of a kind this method does not adapt."""
        what = f"an {kind} layer" if kind and kind[0] in "aeiou" else f"a {kind} layer"
        if type_name:
            what += f" ({type_name})"
        others = " or ".join(repr(m.name) for m in _REGISTRY.values() if kind in m.kinds)
        kinds = "; ".join(f"{k}: {KINDS[k]}" for k in self.kinds)
        return (
            f"method={self.name!r} supports {' and '.join(self.kinds)} layers only; "
            f"{module_name!r} is {what}: "
            + (f"use method {others} for it, or " if others else "")
            + f"leave it out via target_modules / exclude_modules ({kinds})"
        )

    def check(self, cfg: AdapterConfig) -> None:
        """The method's part of ``AdapterConfig.validate``: its inits, its own fields, its rules."""
        if cfg.init not in self.inits:
            owners = " or ".join(repr(m.name) for m in _REGISTRY.values() if cfg.init in m.inits)
            hint = f" (init={cfg.init!r} is an option of method {owners})" if owners else ""
            raise ConfigError(
                f"init={show(cfg.init)} is not supported with method={self.name!r}; "
                f"it takes {list(self.inits)}{hint}"
            )
        options = cfg.method_options
        for key, value in options.items():
            if key not in self.options:
                allowed = list(self.options)
                raise ConfigError(
                    f"method_options: unknown key {show(key)} for method={self.name!r}"
                    + (did_you_mean(key, allowed) if isinstance(key, str) else "")
                    + (f"; allowed: {allowed}" if allowed else "; it takes none")
                )
            check = self.options[key].check
            if check is not None:
                check(f"method_options.{key}", value)
            owner = next((n for n, i in self.inits.items() if key in i.options), cfg.init)
            if owner != cfg.init:
                raise ConfigError(
                    f"method_options.{key} is an option of init={owner!r} but init={show(cfg.init)}; "
                    f"set init: {owner} or drop it"
                )
        if self.validate is not None:
            self.validate(cfg)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (or replace the entry of the same name) and return it."""
    if not isinstance(method.name, str) or not method.name.isidentifier():
        raise ConfigError(f"method name {show(method.name)} is invalid; expected an identifier")
    unknown = sorted(set(method.kinds) - set(KINDS))
    if unknown or not method.kinds:
        raise ConfigError(
            f"method {method.name!r}: kinds {list(method.kinds)} are invalid; expected some of {list(KINDS)}"
        )
    if "default" not in method.inits:
        raise ConfigError(f"method {method.name!r}: inits must include 'default' (adapter files read as it)")
    if method.name in {v.name for v in VARIANTS}:
        raise ConfigError(
            f"method name {method.name!r} is taken by a training setup ({variant(method.name).doc})"
        )
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method's entry (a registered method outside lorakit, e.g. in a test)."""
    _REGISTRY.pop(name, None)


def replace(name: str, **changes: Any) -> Method:
    """Register a copy of ``name``'s entry with some fields changed (e.g. another builder)."""
    return register(dataclasses.replace(get(name), **changes))


def get(name: Any) -> Method:
    """The entry of method ``name``; an unknown name is a ConfigError listing the registered ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"method={show(name)} is not supported; expected one of {list(_REGISTRY)}"
            + (did_you_mean(name, list(_REGISTRY)) if isinstance(name, str) else "")
        )
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (lora, dora, adalora, then any others)."""
    return tuple(_REGISTRY)


def entries() -> tuple[Method, ...]:
    """Every registered entry, in registration order."""
    return tuple(_REGISTRY.values())


def inits() -> tuple[str, ...]:
    """Every ``AdapterConfig.init`` value some registered method accepts."""
    return tuple(dict.fromkeys(i for m in _REGISTRY.values() for i in m.inits))


def init_entry(cfg: AdapterConfig) -> Init:
    """The registry's :class:`Init` for ``cfg.init`` under ``cfg.method`` (a validated config has one)."""
    return get(cfg.method).inits[cfg.init]


def by_peft_type(peft_type: str) -> list[Method]:
    """Methods whose adapters are written with ``peft_type``."""
    return [m for m in _REGISTRY.values() if m.peft is not None and m.peft.peft_type == peft_type]


def peft_types() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.peft.peft_type for m in _REGISTRY.values() if m.peft is not None))


def json_field(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    """``d[key]`` checked to be of ``types`` (a bool is not an int), ``default`` when absent or null; the
    ConfigError names the json field. For a codec's ``from_peft``."""
    value = d.get(key, default)
    if value is None:
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ConfigError(
            f"{key}={show(value)} has the wrong type; expected {' or '.join(t.__name__ for t in allowed)}"
        )
    return value


# ------------------------------------------------------------------------------ training setups
@dataclass(frozen=True)
class Variant:
    """A training setup with a method-like name that is not an adapter method.

    ``method``: the adapter method it trains (None: no adapter, every weight trains); ``quantized``:
    the frozen base is stored in NF4; ``init`` / ``options``: the adapter's ``init`` and
    ``method_options`` it sets (LoftQ, OLoRA, LoRA+), see :meth:`adapter_fields`."""

    name: str
    method: str | None
    quantized: bool = False
    doc: str = ""
    init: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def adapter_fields(self, adapter: Mapping[str, Any]) -> dict[str, Any]:
        """The fields this setup sets in a config's adapter section ``adapter`` (its method, init and
        options; options merged over the section's own ``method_options``)."""
        out: dict[str, Any] = {"method": self.method}
        if self.init is not None:
            out["init"] = self.init
        if self.options:
            out["method_options"] = {**dict(adapter.get("method_options") or {}), **self.options}
        return out


VARIANTS: tuple[Variant, ...] = (
    Variant("full", None, doc="full fine-tuning: every weight trains, no adapter"),
    Variant(
        "qlora", "lora", quantized=True, doc="LoRA on an NF4-quantized frozen base (Dettmers et al. 2023)"
    ),
    Variant("loftq", "lora", quantized=True, init="loftq",
            doc="QLoRA with LoftQ's init: the adapter starts at the base's quantization error (Li et al. 2023)"),
    Variant("olora", "lora", init="olora", doc="LoRA with OLoRA's QR init (Buyukakyuz 2024)"),
    Variant("corda", "lora", init="corda",
            doc="LoRA with CorDA's init from W and its inputs' covariance on training rows (Yang et al. 2024)"),
    Variant("loraplus", "lora", options={"loraplus_lr_ratio": 16},
            doc="LoRA+: B learns 16x faster than A (Hayou et al. 2024)"),
)


def variant(name: str) -> Variant | None:
    """The :class:`Variant` called ``name``, or None for an adapter method (or an unknown name)."""
    return next((v for v in VARIANTS if v.name == name), None)


def setups(adapters_only: bool = False) -> tuple[str, ...]:
    """Every name a training setup goes by: "full" (unless ``adapters_only``), then each registered
    method followed by its variants: ("full", "lora", "qlora", "loftq", "olora", "loraplus", "dora",
    "adalora", ...)."""
    out = [] if adapters_only else [v.name for v in VARIANTS if v.method is None]
    for name in _REGISTRY:
        out.append(name)
        out.extend(v.name for v in VARIANTS if v.method == name)
    return tuple(out)


def adapter_method(setup: str) -> str | None:
    """The adapter method a setup trains ("qlora" -> "lora", "full" -> None, "dora" -> "dora")."""
    v = variant(setup)
    return v.method if v is not None else get(setup).name
