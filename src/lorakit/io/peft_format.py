"""PEFT's adapter file format (peft 0.21): tensor key names and ``adapter_config.json`` <-> AdapterConfig.

Keys: ``base_model.model.<module path>.<name>`` where ``<name>`` is what the adapter's ``peft_state()``
returns (``lora_A.weight``, ``lora_embedding_A``, ``lora_magnitude_vector``, ``lora_E``, ...) and, for a
module in ``modules_to_save``, the trained copy's own ``state_dict`` names (``classifier.weight``).

Config: the fields every LoRA-family ``peft_type`` shares (r, lora_alpha, lora_dropout, target_modules,
init_lora_weights, ...) are read and written here; each method's own fields through its registry entry's
codec (``lorakit.methods.PeftCodec``, in the method's file: "LORA" for lora and dora -- DoRA claims the
files with ``use_dora`` true -- and "ADALORA"). ``peft_type``, ``task_type`` and
``base_model_name_or_path`` are added by the caller.

:func:`register_peft_type` is the older hook (kept for one release): a codec for a whole json, used
before the registry's, ``from_peft(data) -> AdapterConfig`` and ``to_peft(cfg, model, adapter_name)
-> dict``, with the optional ``layer_kwargs(data) -> {module path: kwargs}`` for ``load_peft_state``.

What PEFT accepts quietly and we refuse: ``r = 0``, an unknown ``peft_type``, ``bias`` other than
"none", and PEFT features lorakit does not implement (``lora_bias``, ``layer_replication``, ...).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit import methods
from lorakit.adapters.adalora_peft import adalora_rank_masks  # noqa: F401  (moved; kept here for one release)
from lorakit.config import AdapterConfig, ConfigError, show
from lorakit.methods import Method
from lorakit.surgery.inject import adapted_layers
from lorakit.surgery.targets import TargetError, describe_modules, head_names, match_targets

PREFIX = methods.PEFT_PREFIX
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# PEFT task_type <-> lorakit build_model task (for ``lorakit merge``) and model class suffixes.
TASK_FROM_PEFT = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "FEATURE_EXTRACTION": "base"}
_TASK_BY_CLASS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)
# init_lora_weights values of PEFT's that lorakit reads as its default init: they only set starting
# values, which the loaded tensors overwrite (the base is untouched).
_LOADS_AS_DEFAULT = ("eva", "orthogonal")
# PEFT features lorakit does not implement: each must be absent/null/false/empty.
_UNSUPPORTED = (
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "megatron_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)


@dataclass(frozen=True)
class PeftCodec:
    """A whole-json codec registered through :func:`register_peft_type` (the older hook)."""

    peft_type: str
    methods: tuple[str, ...]
    from_peft: Callable[[Mapping[str, Any]], AdapterConfig]
    to_peft: Callable[[AdapterConfig, nn.Module, str], dict[str, Any]]
    layer_kwargs: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None


_CODECS: dict[str, PeftCodec] = {}  # only what register_peft_type added; the methods' are in the registry


def register_peft_type(
    peft_type: str,
    methods: tuple[str, ...],
    from_peft: Callable[[Mapping[str, Any]], AdapterConfig],
    to_peft: Callable[[AdapterConfig, nn.Module, str], dict[str, Any]],
    layer_kwargs: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Register (or replace) a whole-json codec for ``peft_type``, used to read it and to save adapters
    of ``methods`` before the registry's codecs. Kept for one release: a method's file format belongs in
    its registry entry (``lorakit.methods.PeftCodec``)."""
    _CODECS[peft_type] = PeftCodec(peft_type, tuple(methods), from_peft, to_peft, layer_kwargs)


def _readable() -> list[str]:
    return sorted(set(_CODECS) | set(methods.peft_types()))


def method_for_peft(data: Mapping[str, Any]) -> Method:
    """The registered method whose codec reads ``data``: among those writing its peft_type, the one
    whose ``claims`` accepts it, else the one without ``claims``."""
    peft_type = data.get("peft_type")
    candidates = methods.by_peft_type(peft_type)
    claimed = [m for m in candidates if m.peft.claims is not None and m.peft.claims(data)]
    rest = [m for m in candidates if m.peft.claims is None]
    if not (claimed or rest):
        raise ConfigError(f"peft_type={show(peft_type)}: no registered method reads this file")
    return (claimed or rest)[0]


def _check_peft_type(peft_type: Any, source: str) -> None:
    if not isinstance(peft_type, str) or (peft_type not in _CODECS and peft_type not in methods.peft_types()):
        raise ConfigError(
            f"{source}: peft_type={show(peft_type)} is not supported; lorakit reads {_readable()}"
        )


def codec_for_method(method: str) -> PeftCodec | methods.PeftCodec:
    """What writes ``method``'s adapters: a codec from :func:`register_peft_type` naming it (latest
    wins), else the method's registry entry's."""
    for codec in reversed(list(_CODECS.values())):
        if method in codec.methods:
            return codec
    codec = methods.get(method).peft
    if codec is None:
        raise ConfigError(f"method={method!r} has no PEFT file format registered; known: {_readable()}")
    return codec


# ----------------------------------------------------------------------------------------- reading
_get = methods.json_field


def _targets(d: Mapping[str, Any], key: str) -> str | tuple[str, ...] | None:
    value = _get(d, key, (str, list))
    return tuple(value) if isinstance(value, list) else value


def _peft_inits() -> dict[bool | str, str]:
    """init_lora_weights value -> lorakit init name, over the inits of every registered method."""
    return {i.peft_value: name for m in methods.entries() for name, i in m.inits.items()}


def _calibrated_inits() -> set[bool | str]:
    """init_lora_weights values of inits computed from calibration inputs (``Init.reads_inputs``: CorDA)."""
    return {i.peft_value for m in methods.entries() for i in m.inits.values() if i.reads_inputs}


def _init_from_peft(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "default"
    known = _peft_inits()
    if isinstance(value, str) and value in _LOADS_AS_DEFAULT:
        return "default"
    if isinstance(value, str) and value.startswith("pissa_niter_") and "pissa" in known:
        warnings.warn(
            f"init_lora_weights={value!r}: lorakit recomputes the PiSSA residual with an exact SVD",
            stacklevel=3,
        )
        return known["pissa"]
    if isinstance(value, str) and value in _calibrated_inits():
        raise ConfigError(
            f"init_lora_weights={value!r}: the file was saved unconverted, so it is only right on PEFT's residual "
            "model (W minus the init's part, computed from calibration rows the file does not hold); save it "
            "with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) or from lorakit"
        )
    if isinstance(value, str) and value in known:
        return known[value]
    names = [repr(v) for v in [*(k for k in known if isinstance(k, str)), *_LOADS_AS_DEFAULT]]
    raise ConfigError(
        f"init_lora_weights={show(value)} is not supported; lorakit loads true/false, {', '.join(names)} "
        "adapters (others change the base weights in ways lorakit cannot redo)"
    )


def common_from_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    """AdapterConfig fields every LoRA-family peft_type shares (validated; errors name the field)."""
    for key in _UNSUPPORTED:
        if d.get(key):
            raise ConfigError(
                f"{key}={show(d[key])} is a PEFT feature lorakit does not support (expected null/false)"
            )
    bias = _get(d, "bias", str, "none")
    if bias != "none":
        raise ConfigError(
            f"bias={bias!r} is not supported; lorakit adapters train no biases (expected 'none')"
        )
    layers = _get(d, "layers_to_transform", (int, list))
    pattern = _get(d, "layers_pattern", (str, list))
    if isinstance(pattern, list):
        if len(pattern) != 1 or not isinstance(pattern[0], str):
            raise ConfigError(f"layers_pattern={show(pattern)}: lorakit supports one layer container name")
        pattern = pattern[0]
    modules_to_save = _get(d, "modules_to_save", list, [])
    if not all(isinstance(m, str) and m for m in modules_to_save):
        raise ConfigError(f"modules_to_save={show(modules_to_save)} must be a list of module names")
    return dict(
        alpha=_get(d, "lora_alpha", (int, float), 8),
        dropout=_get(d, "lora_dropout", (int, float), 0.0),
        target_modules=_targets(d, "target_modules"),
        exclude_modules=_targets(d, "exclude_modules"),
        layers_to_transform=layers,
        layers_pattern=pattern,
        alpha_pattern=_get(d, "alpha_pattern", dict, {}),
        modules_to_save=tuple(dict.fromkeys(modules_to_save)),  # PEFT may list a name twice
        init=_init_from_peft(d.get("init_lora_weights", True)),
    )


# lorakit field -> the json field it is read from, so a config error names what the file says
_PEFT_NAMES = dict(alpha="lora_alpha", dropout="lora_dropout", init="init_lora_weights")


def _config(renames: Mapping[str, str], **fields: Any) -> AdapterConfig:
    try:
        return AdapterConfig(**fields)
    except ConfigError as e:
        msg, name = str(e), re.match(r"\w+", str(e))
        if name and name.group(0) in renames:
            msg = renames[name.group(0)] + msg[name.end() :]
        raise ConfigError(msg) from None


def config_from_peft(data: Any, source: str = CONFIG_NAME) -> tuple[AdapterConfig, dict[str, Any]]:
    """Parse an adapter_config.json mapping: (AdapterConfig, metadata with task_type,
    base_model_name_or_path and, if the codec has any, "layer_kwargs" for ``load_peft_state``).
    Every error is a ConfigError starting with ``source``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    _check_peft_type(peft_type, source)
    try:
        if peft_type in _CODECS:
            legacy = _CODECS[peft_type]
            cfg = legacy.from_peft(data)
            layer_kwargs = legacy.layer_kwargs(data) if legacy.layer_kwargs else {}
        else:
            cfg, layer_kwargs = _from_registry(data)
        meta = {k: _get(data, k, str) for k in ("task_type", "base_model_name_or_path")}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if layer_kwargs:
        meta["layer_kwargs"] = layer_kwargs
    return cfg, meta


def _from_registry(data: Mapping[str, Any]) -> tuple[AdapterConfig, dict[str, dict[str, Any]]]:
    method = method_for_peft(data)
    codec = method.peft
    fields = common_from_peft(data)
    own = codec.from_peft(data)
    cfg = _config({**_PEFT_NAMES, **codec.json_names}, method=method.name, **{**fields, **own})
    return cfg, (codec.layer_kwargs(data) if codec.layer_kwargs else {})


# ----------------------------------------------------------------------------------------- writing
def adapter_layer_names(model: nn.Module, adapter_name: str) -> list[str]:
    return [n for n, layer in adapted_layers(model) if adapter_name in layer.adapters]


def _explicit_targets(cfg: AdapterConfig, model: nn.Module, adapter_name: str) -> str | list[str]:
    """target_modules as PEFT should read them. A user list or regex is kept (PEFT matches as lorakit
    does); None / "all-linear" are resolved to the adapted leaf names, or to the full names when the
    leaf names would also match modules that were not adapted."""
    spec = cfg.target_modules
    if isinstance(spec, tuple):
        return list(spec)
    if isinstance(spec, str) and spec != "all-linear":
        return spec
    names = adapter_layer_names(model, adapter_name)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    try:
        if (
            match_targets(describe_modules(model), cfg.replace(target_modules=leaves), head_names(model))
            == names
        ):
            return leaves
    except TargetError:
        pass
    return names


def common_to_peft(cfg: AdapterConfig, model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The json fields every LoRA-family peft_type shares, from a config and the model it is in."""
    layers = [layer for _, layer in adapted_layers(model) if adapter_name in layer.adapters]
    exclude = cfg.exclude_modules
    return {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _explicit_targets(cfg, model, adapter_name),
        "exclude_modules": list(exclude) if isinstance(exclude, tuple) else exclude,
        "fan_in_fan_out": bool(layers) and all(layer.access.fan_in_fan_out for layer in layers),
        "bias": cfg.bias,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "layers_to_transform": list(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None,
        "layers_pattern": cfg.layers_pattern,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "init_lora_weights": methods.get(cfg.method).inits[cfg.init].peft_value,
        "inference_mode": True,
    }


def task_type_of(model: nn.Module) -> str | None:
    """PEFT task_type for a transformers model class (None for a bare backbone or a non-HF model)."""
    cls = type(model).__name__
    for suffix, task in _TASK_BY_CLASS:
        if cls.endswith(suffix):
            return task
    return None


def config_to_peft(
    cfg: AdapterConfig,
    model: nn.Module,
    adapter_name: str,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json mapping for adapter ``adapter_name`` of ``model``."""
    codec = codec_for_method(cfg.method)
    if isinstance(codec, PeftCodec):  # register_peft_type's: the whole json
        data = codec.to_peft(cfg, model, adapter_name)
    else:
        layers = adapted_layers(model)
        adapters = {n: layer.adapters[adapter_name] for n, layer in layers if adapter_name in layer.adapters}
        data = {**common_to_peft(cfg, model, adapter_name), **codec.to_peft(cfg, adapters)}
    data.update(
        peft_type=codec.peft_type, task_type=task_type, base_model_name_or_path=base_model_name_or_path
    )
    data.setdefault("revision", None)  # PEFT writes it (the base model's hub revision); consumers read it
    return dict(sorted(data.items()))
