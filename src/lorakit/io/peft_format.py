"""PEFT's adapter file format (peft 0.21): tensor key names and ``adapter_config.json`` <-> AdapterConfig.

Keys: ``base_model.model.<module path>.<name>`` where ``<name>`` is what the adapter's ``peft_state()``
returns (``lora_A.weight``, ``lora_embedding_A``, ``lora_magnitude_vector``, ``lora_E``, ...) and, for a
module in ``modules_to_save``, the trained copy's own ``state_dict`` names (``classifier.weight``).

Config: one *codec* per ``peft_type`` converts the json both ways. lorakit ships codecs for "LORA"
(methods lora and dora, via ``use_dora``) and "ADALORA". A method module can replace or add one with
:func:`register_peft_type`; the io layer imports the method's module (``lorakit.adapters.<method>``)
before looking a codec up, so a registration there takes effect without io changes::

    register_peft_type("ADALORA", ("adalora",), from_peft=..., to_peft=..., layer_kwargs=...)

``from_peft(data: dict) -> AdapterConfig`` validates the json (raise ConfigError naming the field);
``to_peft(cfg, model, adapter_name) -> dict`` returns the json fields (use :func:`common_to_peft` for
the fields every LoRA-family type shares); the optional ``layer_kwargs(data) -> {module path: kwargs}``
passes per-layer extras to ``adapter.load_peft_state(state, **kwargs)`` -- AdaLoRA's kept-rank masks
(PEFT's ``rank_pattern``: ``"<path>.lora_E"`` -> init_r booleans) reach the adapter this way as
``rank_mask``. ``peft_type``, ``task_type`` and ``base_model_name_or_path`` are added by the caller.

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

from lorakit.adapters.base import builder_for
from lorakit.config import AdapterConfig, ConfigError, show
from lorakit.surgery.inject import adapted_layers
from lorakit.surgery.targets import TargetError, describe_modules, head_names, match_targets

PREFIX = "base_model.model."
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
# init_lora_weights values whose adapters load onto an untouched base (the init is overwritten).
_PLAIN_INITS = {"gaussian": "gaussian", "eva": "default", "orthogonal": "default"}
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
    """Converts one ``peft_type``'s json to/from AdapterConfig (see the module docstring)."""

    peft_type: str
    methods: tuple[str, ...]
    from_peft: Callable[[Mapping[str, Any]], AdapterConfig]
    to_peft: Callable[[AdapterConfig, nn.Module, str], dict[str, Any]]
    layer_kwargs: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None


_CODECS: dict[str, PeftCodec] = {}
_METHOD_OF_TYPE = {"LORA": "lora", "ADALORA": "adalora"}


def register_peft_type(
    peft_type: str,
    methods: tuple[str, ...],
    from_peft: Callable[[Mapping[str, Any]], AdapterConfig],
    to_peft: Callable[[AdapterConfig, nn.Module, str], dict[str, Any]],
    layer_kwargs: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Register (or replace) the codec for ``peft_type``, used to save adapters of ``methods``.
    ``layer_kwargs(json) -> {module path: kwargs}`` optionally passes per-layer extras from the json
    to ``adapter.load_peft_state(state, **kwargs)`` (AdaLoRA: its kept-rank mask)."""
    _CODECS[peft_type] = PeftCodec(peft_type, tuple(methods), from_peft, to_peft, layer_kwargs)


def _import_method(method: str) -> None:
    try:
        builder_for(method)  # imports lorakit.adapters.<method>, which may register a codec
    except ConfigError:
        pass


def codec_for_peft_type(peft_type: Any, source: str = CONFIG_NAME) -> PeftCodec:
    if isinstance(peft_type, str) and peft_type in _METHOD_OF_TYPE:
        _import_method(_METHOD_OF_TYPE[peft_type])
    if not isinstance(peft_type, str) or peft_type not in _CODECS:
        raise ConfigError(
            f"{source}: peft_type={show(peft_type)} is not supported; lorakit reads {sorted(_CODECS)}"
        )
    return _CODECS[peft_type]


def codec_for_method(method: str) -> PeftCodec:
    _import_method(method)
    for codec in reversed(list(_CODECS.values())):  # latest registration wins
        if method in codec.methods:
            return codec
    raise ConfigError(f"method={method!r} has no PEFT file format registered; known: {sorted(_CODECS)}")


# ----------------------------------------------------------------------------------------- reading
def _get(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{key}={show(value)} has the wrong type; expected {_type_names(types)}")
    if not isinstance(value, types):
        raise ConfigError(f"{key}={show(value)} has the wrong type; expected {_type_names(types)}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _targets(d: Mapping[str, Any], key: str) -> str | tuple[str, ...] | None:
    value = _get(d, key, (str, list))
    return tuple(value) if isinstance(value, list) else value


def _init_from_peft(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "default"
    if isinstance(value, str) and value in _PLAIN_INITS:
        return _PLAIN_INITS[value]
    if isinstance(value, str) and (value == "pissa" or value.startswith("pissa_niter_")):
        if value != "pissa":
            warnings.warn(
                f"init_lora_weights={value!r}: lorakit recomputes the PiSSA residual with an exact SVD",
                stacklevel=3,
            )
        return "pissa"
    raise ConfigError(
        f"init_lora_weights={show(value)} is not supported; lorakit loads true/false, 'gaussian', 'eva', "
        "'orthogonal' and 'pissa' adapters (others change the base weights in ways lorakit cannot redo)"
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
_PEFT_NAMES = dict(alpha="lora_alpha", dropout="lora_dropout", init="init_lora_weights", delta_t="deltaT")


def _config(renames: Mapping[str, str], **fields: Any) -> AdapterConfig:
    try:
        return AdapterConfig(**fields)
    except ConfigError as e:
        msg, name = str(e), re.match(r"\w+", str(e))
        if name and name.group(0) in renames:
            msg = renames[name.group(0)] + msg[name.end() :]
        raise ConfigError(msg) from None


def _lora_from_peft(d: Mapping[str, Any]) -> AdapterConfig:
    fields = common_from_peft(d)
    use_dora = _get(d, "use_dora", bool, False)
    if use_dora and fields["init"] == "pissa":
        raise ConfigError("init_lora_weights='pissa' with use_dora=true is not supported")
    return _config(
        _PEFT_NAMES,
        method="dora" if use_dora else "lora",
        r=_get(d, "r", int, 8),
        use_rslora=_get(d, "use_rslora", bool, False),
        rank_pattern=_get(d, "rank_pattern", dict, {}),
        **fields,
    )


def adalora_rank_masks(masks: Mapping[str, Any]) -> dict[str, list[bool]]:
    """PEFT's AdaLoRA ``rank_pattern`` (``"<module>.lora_E"`` -> kept-rank booleans over init_r) keyed by
    module path. The saved tensors hold only the kept ranks (PEFT slices them on save)."""
    out: dict[str, list[bool]] = {}
    for key, mask in masks.items():
        if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
            raise ConfigError(
                f"rank_pattern[{show(key)}] must be a list of booleans (AdaLoRA's kept-rank mask)"
            )
        module = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        out[re.sub(r"\.lora_E(\.[^.]+)?$", "", module)] = mask
    return out


def _adalora_from_peft(d: Mapping[str, Any]) -> AdapterConfig:
    if _get(d, "use_dora", bool, False):
        raise ConfigError("use_dora=true cannot be combined with peft_type='ADALORA'")
    if _get(d, "use_rslora", bool, False):
        raise ConfigError("use_rslora=true cannot be combined with peft_type='ADALORA'")
    fields = common_from_peft(d)
    target_r, init_r = _get(d, "target_r", int, 8), _get(d, "init_r", int, 12)
    for key, mask in adalora_rank_masks(_get(d, "rank_pattern", dict, {})).items():
        if len(mask) != init_r:
            raise ConfigError(f"rank_pattern[{key!r}] has {len(mask)} entries; expected init_r={init_r}")
    # rank_pattern is AdaLoRA's kept-rank masks, not a rank override: it reaches the adapter through
    # load_peft_state(rank_mask=...) (see _adalora_layer_kwargs), not through the config.
    return _config(
        {**_PEFT_NAMES, "r": "target_r"},
        method="adalora",
        r=target_r,
        init_r=init_r,
        target_r=target_r,
        tinit=_get(d, "tinit", int, 0),
        tfinal=_get(d, "tfinal", int, 0),
        delta_t=_get(d, "deltaT", int, 1),
        beta1=_get(d, "beta1", (int, float), 0.85),
        beta2=_get(d, "beta2", (int, float), 0.85),
        orth_reg_weight=_get(d, "orth_reg_weight", (int, float), 0.5),
        total_step=_get(d, "total_step", int),
        **fields,
    )


def _adalora_layer_kwargs(d: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    masks = adalora_rank_masks(d.get("rank_pattern") or {})
    return {path: {"rank_mask": mask} for path, mask in masks.items()}


def config_from_peft(data: Any, source: str = CONFIG_NAME) -> tuple[AdapterConfig, dict[str, Any]]:
    """Parse an adapter_config.json mapping: (AdapterConfig, metadata with task_type,
    base_model_name_or_path and, if the codec has any, "layer_kwargs" for ``load_peft_state``).
    Every error is a ConfigError starting with ``source``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    codec = codec_for_peft_type(data.get("peft_type"), source)
    try:
        cfg = codec.from_peft(data)
        layer_kwargs = codec.layer_kwargs(data) if codec.layer_kwargs else {}
        meta = {k: _get(data, k, str) for k in ("task_type", "base_model_name_or_path")}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if layer_kwargs:
        meta["layer_kwargs"] = layer_kwargs
    return cfg, meta


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


def _init_to_peft(init: str) -> bool | str:
    return {"default": True}.get(init, init)


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
        "init_lora_weights": _init_to_peft(cfg.init),
        "inference_mode": True,
    }


def _lora_to_peft(cfg: AdapterConfig, model: nn.Module, adapter_name: str) -> dict[str, Any]:
    return {
        **common_to_peft(cfg, model, adapter_name),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.method == "dora",
    }


def _adalora_to_peft(cfg: AdapterConfig, model: nn.Module, adapter_name: str) -> dict[str, Any]:
    d = common_to_peft(cfg, model, adapter_name)
    # PEFT's rank_pattern for AdaLoRA is a kept-rank mask over init_r per "<module>.lora_E"; only the
    # count matters on load (the tensors are saved with the kept ranks).
    masks = {}
    for name, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        mask = getattr(adapter, "rank_mask", None)
        if mask is not None:
            masks[f"{name}.lora_E"] = [bool(b) for b in mask.tolist()]
        else:
            kept = int(getattr(adapter, "r", cfg.init_r))
            masks[f"{name}.lora_E"] = [True] * kept + [False] * (cfg.init_r - kept)
    if all(all(m) for m in masks.values()):
        masks = {}  # nothing pruned: PEFT's rank_pattern stays null
    total = cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1  # PEFT needs > 0
    d.update(
        rank_pattern=masks or None,
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=total,
    )
    return d


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
    data = codec.to_peft(cfg, model, adapter_name)
    data.update(
        peft_type=codec.peft_type, task_type=task_type, base_model_name_or_path=base_model_name_or_path
    )
    return dict(sorted(data.items()))


register_peft_type("LORA", ("lora", "dora"), _lora_from_peft, _lora_to_peft)
register_peft_type("ADALORA", ("adalora",), _adalora_from_peft, _adalora_to_peft, _adalora_layer_kwargs)
