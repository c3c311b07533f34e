"""Quantize on load: build a Hugging Face model with empty weights and stream its safetensors shards.

QLoRA's point (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) is fine-tuning models whose
16-bit weights do not fit in memory, so the full-precision model must never be materialised: the
model skeleton is built with its parameters on the ``meta`` device (buffers such as rotary
frequencies stay real), eligible Linear layers are swapped for empty NF4Linear shells, and every
tensor of every shard is read one at a time with plain file reads (no memory map, whose touched pages
would stay resident for the whole shard): a Linear weight is quantized as it arrives and dropped;
anything else becomes the model's parameter. Peak memory is about the quantized model plus one
full-precision tensor (and its fp32 quantization chunk).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorakit.config import QuantConfig
from lorakit.quant.linear import NF4Linear
from lorakit.quant.model import eligible_layers, head_names, layer_kwargs, set_module
from lorakit.quant.nf4 import QuantError
from lorakit.state import state_of
from lorakit.weights import is_gpt2_conv1d

TASKS = ("causal-lm", "classification", "base")


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while constructing a model (buffers stay real)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise QuantError(f"{index}: lists shard files that do not exist: {missing[:3]}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        present = sorted(p.name for p in path.iterdir())[:8]
        raise QuantError(
            f"{path}: no *.safetensors weights found (files: {present}); save the model with "
            "save_pretrained(dir, safe_serialization=True) - pickled .bin weights are not loaded"
        )
    return files


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a safetensors file one tensor at a time, each read into its own
    memory with plain file reads (the safetensors format: 8-byte little-endian header length, JSON
    header, raw little-endian data). Unlike a memory map, no page of the file stays in this process's
    resident memory after its tensor is dropped, so peak memory is the largest tensor, not the shard."""
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise QuantError(f"{path}: not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise QuantError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if end == begin:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            f.seek(8 + n + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != end - begin:
                raise QuantError(f"{path}: truncated data for tensor {name!r}")
            yield name, torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _build_empty(path: Path, task: str, num_labels: int) -> nn.Module:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - only without the hf extra
        raise QuantError("load_quantized needs transformers: pip install 'lorakit[hf]'") from e
    if task not in TASKS:
        raise QuantError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if task == "classification":
        hf_config.num_labels = num_labels
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]
    with _params_on_meta():
        return auto.from_config(hf_config)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise QuantError(
                f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}"
            )
        module._parameters[attr] = nn.Parameter(
            value, requires_grad=old.requires_grad if old is not None else True
        )
    else:
        module._buffers[attr] = value


def _key_resolver(model: nn.Module, expected: set[str]):
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
            return key[len(prefix) + 1 :]
        return None

    return resolve


@torch.no_grad()
def load_quantized(
    model_dir: str | os.PathLike,
    config: QuantConfig | None = None,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a Hugging Face model directory with its eligible Linear weights quantized as they stream in.

    Args:
        model_dir: a local directory with config.json and safetensors weights (one file or shards
            with model.safetensors.index.json).
        config: QuantConfig (default NF4, block 64, double quant, bf16 compute, skip lm_head).
        task: "causal-lm", "classification" (a fresh head with ``num_labels`` is initialised and
            left in full precision) or "base".
        dtype: dtype of the weights kept in full precision (default: as stored in the file).

    Returns the model in eval mode, equal to ``quantize(AutoModel.from_pretrained(dir), config)``.
    """
    config = config or QuantConfig()
    path = Path(model_dir)
    if not path.is_dir():
        raise QuantError(f"model_dir {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise QuantError(f"{path}: no config.json; expected a Hugging Face model directory (save_pretrained)")
    shards = _shards(path)
    model = _build_empty(path, task, num_labels)
    targets = eligible_layers(model, config)  # checks everything on the meta skeleton first
    kwargs = layer_kwargs(config)
    for name, layer in targets.items():
        n_in, n_out = layer.weight.shape if is_gpt2_conv1d(layer) else layer.weight.shape[::-1]
        has_bias = getattr(layer, "bias", None) is not None
        shell = NF4Linear(int(n_in), int(n_out), bias=has_bias, device="meta", **kwargs)  # filled by _store
        set_module(model, name, shell)
    expected = {n for n, p in model.named_parameters(remove_duplicate=False)} | {
        n for n, _ in model.named_buffers()
    }
    expected |= {f"{n}.weight" for n in targets}
    resolve = _key_resolver(model, expected)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for shard in shards:
        for key, tensor in iter_safetensors(shard):
            name = resolve(key)
            if name is None:
                unexpected.append(key)
                continue
            mod_name, _, attr = name.rpartition(".")
            if mod_name in targets and attr == "weight":
                w = tensor.t() if is_gpt2_conv1d(targets[mod_name]) else tensor
                model.get_submodule(mod_name)._store(w)
            elif mod_name in targets and attr == "bias":
                model.get_submodule(mod_name).bias = nn.Parameter(tensor, requires_grad=False)
            else:
                _set_tensor(
                    model,
                    name,
                    tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype),
                )
            loaded.add(name)
            del tensor
    if unexpected:
        warnings.warn(
            f"{path}: {len(unexpected)} checkpoint tensors not used by the model: {unexpected[:5]}",
            stacklevel=2,
        )
    missing = {n for n in expected if n not in loaded}
    _finish(model, path, missing)
    state_of(model).quant = config
    return model.eval()


def _finish(model: nn.Module, path: Path, missing: set[str]) -> None:
    """Tie weights, then initialise a missing task head; any other missing tensor is an error."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    still = sorted(n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta")
    # a quantized layer whose weight never arrived still has meta buffers: report its checkpoint key
    empty = sorted({n.rpartition(".")[0] + ".weight" for n, b in model.named_buffers() if b.is_meta})
    heads = head_names(model)
    not_head = empty + [n for n in still if n.rpartition(".")[0] not in heads]
    if not_head:
        raise QuantError(f"{path}: the checkpoint lacks {len(not_head)} model tensors, e.g. {not_head[:5]}")
    untied = [n for n in missing if n in still]
    if still:
        init = getattr(model, "_init_weights", None)
        for name in still:
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            p = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad
            )
        for mod_name in sorted({n.rpartition(".")[0] for n in still}):
            module = model.get_submodule(mod_name)
            if callable(init):
                init(module)
            else:  # pragma: no cover - non-HF models
                module.reset_parameters()
        warnings.warn(
            f"{path}: newly initialised head tensors (not in the checkpoint): {untied or still}", stacklevel=3
        )
