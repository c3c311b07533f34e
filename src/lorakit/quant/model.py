"""Quantize a whole model in place, undo it, and measure what its weights occupy.

``quantize`` swaps every eligible ``nn.Linear`` (and Hugging Face GPT-2 ``Conv1D``) for a frozen
:class:`~lorakit.quant.linear.NF4Linear`, except names in ``QuantConfig.skip`` and the output head.
LoRA added afterwards on top of these layers is QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorakit.config import QUANT_DTYPES, QuantConfig
from lorakit.models.families import TASK_HEADS
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import QuantError, QuantSpec, check_spec
from lorakit.state import peek_state, set_state, state_of
from lorakit.weights import is_gpt2_conv1d

# Top-level module names of task heads: never quantized (a fresh classifier head must stay trainable
# in full precision, and an LM head is where 4-bit error hurts most).
HEAD_NAMES = TASK_HEADS
# Layer classes that are already quantized by bitsandbytes (matched by name: no import needed).
_BNB_CLASSES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear) or type(module).__name__ in _BNB_CLASSES


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def head_names(model: nn.Module) -> set[str]:
    """Names of the output head modules: ``get_output_embeddings()`` and the usual task heads."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[0] in HEAD_NAMES:
            heads.add(name)
    return heads


def _spec_for(module: nn.Module, config: QuantConfig) -> QuantSpec:
    n_in, n_out = module.weight.shape if is_gpt2_conv1d(module) else module.weight.shape[::-1]
    return QuantSpec(
        (int(n_out), int(n_in)),
        config.dtype,
        config.blocksize,
        config.double_quant,
        config.double_quant_blocksize,
    )


def eligible_layers(
    model: nn.Module, config: QuantConfig, modules: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """Name -> layer that ``quantize`` would replace (checked, nothing changed).

    Raises QuantError for: a model already quantized, an unsupported dtype, a listed module that
    is missing or not a Linear/Conv1D, a blocksize that does not divide a layer's weight, or no
    eligible layer at all.
    """
    if not isinstance(config, QuantConfig):
        raise QuantError(f"config: expected a lorakit QuantConfig, got {type(config).__name__}")
    if config.dtype not in QUANT_DTYPES:
        raise QuantError(f"dtype={config.dtype!r} is not supported; expected one of {list(QUANT_DTYPES)}")
    done = [n for n, m in model.named_modules() if is_quantized_layer(m)]
    if done:
        raise QuantError(
            f"model is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}); quantize a "
            "full-precision model, or call lorakit.quant.dequantize_model first"
        )
    all_modules = dict(model.named_modules())
    if modules is not None:
        names = [modules] if isinstance(modules, str) else list(modules)
        for name in names:
            if name not in all_modules:
                raise QuantError(f"modules: no module named {name!r} in the model")
            m = all_modules[name]
            if not (isinstance(m, nn.Linear) or is_gpt2_conv1d(m)):
                raise QuantError(
                    f"modules: {name!r} is a {type(m).__name__}, not a Linear; only Linear layers are quantized"
                )
        candidates = {n: all_modules[n] for n in names}
    else:
        heads = head_names(model)
        candidates = {
            n: m
            for n, m in all_modules.items()
            if (isinstance(m, nn.Linear) or is_gpt2_conv1d(m))
            and n not in heads
            and not _matches(n, config.skip)
        }
    if not candidates:
        raise QuantError(
            f"no eligible Linear layers to quantize (skip={list(config.skip)}, output head excluded); "
            "the model has nothing for QuantConfig to act on"
        )
    for name, m in candidates.items():
        check_spec(_spec_for(m, config), f"layer {name!r}")
    return candidates


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted submodule path ``name`` of ``model`` (e.g. ``"model.layers.0.mlp"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_kwargs(config: QuantConfig) -> dict:
    return dict(
        quant_type=config.dtype,
        blocksize=config.blocksize,
        double_quant=config.double_quant,
        double_quant_blocksize=config.double_quant_blocksize,
        compute_dtype=config.compute_dtype,
    )


@torch.no_grad()
def quantize(
    model: nn.Module, config: QuantConfig | None = None, modules: Sequence[str] | None = None
) -> nn.Module:
    """Replace eligible Linear layers of ``model`` in place with frozen NF4Linear layers; returns model.

    Args:
        model: any torch model (Hugging Face or not).
        config: QuantConfig (default: NF4, block 64, double quantization, bf16 compute, skip lm_head).
        modules: quantize exactly these module names instead (each must be a Linear/Conv1D).

    All layers are checked before any is replaced, so a failure leaves the model untouched.
    """
    config = config or QuantConfig()
    targets = eligible_layers(model, config, modules)
    kwargs = layer_kwargs(config)
    for name, layer in targets.items():
        set_module(model, name, NF4Linear.from_linear(layer, name=f"layer {name!r}", **kwargs))
    state_of(model).quant = config
    return model


def quantized_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear in place with an nn.Linear holding its dequantized weight (``dtype``,
    default the layer's compute dtype). The result is a full-precision model; returns ``model``."""
    layers = quantized_layers(model)
    if not layers:
        raise QuantError("dequantize_model: the model has no lorakit quantized layers")
    for name, q in layers.items():
        w = q.dense_weight(dtype or q.compute_dtype)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().to(w.dtype), requires_grad=False)
        set_module(model, name, lin)
    state = peek_state(model)
    if state is not None:
        state.quant = None
        set_state(model, state)
    return model


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    for t in module.parameters():
        yield t
        state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit keeps its scales here
        while state is not None:
            for attr in ("absmax", "offset"):
                v = getattr(state, attr, None)
                if isinstance(v, torch.Tensor):
                    yield v
            state = getattr(state, "state2", None)
    yield from module.buffers()


def storage_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (and bitsandbytes 4-bit scale tensors),
    each storage counted once (tied weights once); meta tensors count 0."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in _tensors(module):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def bits_per_param(module: nn.Module) -> float:
    """Stored bits per logical weight element over the module's quantized linears (bias excluded),
    measured from the stored tensors: 8 * sum(bytes of codes and scales) / sum(out * in)."""
    layers = [module] if isinstance(module, NF4Linear) else list(quantized_layers(module).values())
    if not layers:
        raise QuantError("bits_per_param: the module has no lorakit quantized layers")
    return 8.0 * sum(q.weight_storage_bytes() for q in layers) / sum(q.spec.numel for q in layers)
