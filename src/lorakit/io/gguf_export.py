"""Export to llama.cpp's GGUF: a LoRA adapter file, or a merged full model (``lorakit export``).

Written with the ``gguf`` package that ggml publishes (its ``GGUFWriter``, key constants and the
HF -> GGUF tensor name map), following llama.cpp's conventions (``convert_lora_to_gguf.py``,
``src/llama-adapter.cpp``):

- adapter file: ``general.architecture`` = the base's arch, ``general.type`` = "adapter",
  ``adapter.type`` = "lora", ``adapter.lora.alpha``; tensors ``<base tensor>.lora_a`` / ``.lora_b``
  holding PEFT's A (r, k) and B (d, r) as they are (ggml's ne = reversed numpy shape), except for
  ``token_embd.weight``, whose ``lora_a`` is A transposed (vocab, r).
- llama.cpp applies ``delta W = (alpha / r) * B @ A`` with ONE alpha per file and r the rank of that
  tensor (``b->ne[0]``). lorakit's scale per module may differ (rsLoRA alpha/sqrt(r), alpha_pattern,
  AdaLoRA's alpha/(init_r + 1e-5)), so each module's correction ``scale / (alpha_file / r)`` is
  folded into its B: every module's effective update is the one lorakit applies.
- AdaLoRA (SVD form P diag(lambda) Q) is written as plain LoRA exactly: A = lambda * Q, B = P, the
  pruned ranks (lambda = 0) dropped. DoRA cannot be expressed (llama.cpp has no magnitude vector):
  an error points to ``--merged``. So do fully trained ``modules_to_save``.
- llama arch: llama.cpp's rope pairs dimensions differently from HF, so the converter permutes the
  rows of q_proj / k_proj per head; the same permutation is applied to B of those modules (and to
  the merged weights).

Only the Llama family (HF ``model_type`` "llama") has a name map here; anything else is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.io.atomic import atomic_write
from lorakit.surgery.inject import adapted_layers, adapter_configs, trained_copies

OUT_TYPES = ("f32", "f16", "bf16")
_ARCHS = {"llama": "llama"}  # HF model_type -> llama.cpp arch with a tensor name map here


class GGUFExportError(ValueError):
    """What llama.cpp cannot read, or an input the exporter cannot map: one line naming the cause."""


def gguf_module():
    """The ``gguf`` package, imported lazily (an optional extra)."""
    try:
        import gguf
    except ImportError as e:
        raise GGUFExportError('GGUF export needs the gguf package: pip install "lorakit[gguf]"') from e
    return gguf


# ------------------------------------------------------------------------------------- the factors
@dataclass(frozen=True)
class LoraFactors:
    """One module's update as lorakit applies it: ``delta W = scale * B @ A`` (for an embedding,
    ``delta E = scale * (B @ A)^T``). a: (r, k), b: (d, r), fp32."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False


def lora_factors(model: nn.Module, adapter_name: str = "default") -> list[LoraFactors]:
    """The low-rank factors of adapter ``adapter_name`` per adapted module; raises ``GGUFExportError``
    for what is not a plain low-rank update (DoRA, convolutions, fully trained modules)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise GGUFExportError(f"no adapter named {adapter_name!r} in the model; it has {list(configs)}")
    cfg = configs[adapter_name]
    copies = [n for n, tc in trained_copies(model) if adapter_name in tc.copies]
    if copies:
        raise GGUFExportError(
            f"adapter {adapter_name!r} trains full copies of {copies} (modules_to_save); a llama.cpp LoRA "
            "file holds only low-rank pairs: export with --merged instead"
        )
    out: list[LoraFactors] = []
    for name, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        state = {k: v.detach().float().cpu() for k, v in ad.peft_state().items()}
        keys = set(state)
        if "lora_magnitude_vector" in keys or cfg.method == "dora":
            raise GGUFExportError(
                f"{name}: DoRA magnitudes cannot be expressed in a llama.cpp LoRA file; export with --merged"
            )
        if keys == {"lora_A.weight", "lora_B.weight"}:
            a, b = state["lora_A.weight"], state["lora_B.weight"]
            if a.dim() != 2 or not isinstance(layer.base, nn.Linear):
                raise GGUFExportError(
                    f"{name}: LoRA on a {type(layer.base).__name__} has no llama.cpp form (Linear only)"
                )
            out.append(LoraFactors(name, a, b, float(ad.scaling)))
        elif keys == {"lora_embedding_A", "lora_embedding_B"}:
            out.append(LoraFactors(name, state["lora_embedding_A"], state["lora_embedding_B"],
                                   float(ad.scaling), embedding=True))
        elif keys == {"lora_A", "lora_E", "lora_B"}:  # AdaLoRA: P diag(lambda) Q, kept ranks only
            keep = state["lora_E"].flatten() != 0
            a = (state["lora_A"] * state["lora_E"])[keep]
            if int(keep.sum()):
                out.append(LoraFactors(name, a, state["lora_B"][:, keep], float(ad.scaling)))
        else:
            raise GGUFExportError(
                f"{name}: method {cfg.method!r} (tensors {sorted(keys)}) has no llama.cpp LoRA form; "
                "export with --merged"
            )
    if not out:
        raise GGUFExportError(f"adapter {adapter_name!r} has no non-zero low-rank update to export")
    return out


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a pair (llama_adapter_lora_weight::get_scale, adapter scale 1):
    alpha / rank, or 1 when the file's alpha is 0."""
    return alpha / rank if alpha else 1.0


# ------------------------------------------------------------------------------------ arch and names
def llama_arch(config: Any) -> str:
    """The llama.cpp arch of an HF config, after checking the features llama.cpp's llama graph has."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise GGUFExportError(
            f"model_type {model_type!r} has no GGUF name map in lorakit; supported: {sorted(_ARCHS)}"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"config.hidden_act={act!r}: llama.cpp's llama graph uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"config.{flag}=True: biases are not exported (not checked against llama.cpp)")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GGUFExportError(f"rope scaling {rope.get('rope_type')!r} is not exported; only default rope")
    return _ARCHS[model_type]


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _name_map(config: Any):
    gguf = gguf_module()
    arch = llama_arch(config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))


def gguf_name(name_map: Any, hf_name: str) -> str:
    """llama.cpp's tensor name for an HF parameter name (e.g. blk.0.attn_q.weight)."""
    key = hf_name
    for prefix in ("base_model.model.",):
        key = key[len(prefix):] if key.startswith(prefix) else key
    found = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise GGUFExportError(f"{hf_name}: no llama.cpp tensor for this module in the llama name map")
    return found


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from HF's rotate-half layout to llama.cpp's
    interleaved pairs: per head, rows (i, i + hd/2) become adjacent (convert_hf_to_gguf's permute)."""
    d = rows.shape[0]
    return rows.reshape(n_head, 2, d // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_heads(config: Any, gguf_tensor: str) -> int | None:
    if ".attn_q." in gguf_tensor:
        return int(config.num_attention_heads)
    if ".attn_k." in gguf_tensor:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


# -------------------------------------------------------------------------------- tensor encoding
def _encode(t: torch.Tensor, out_type: str) -> tuple[np.ndarray, Any]:
    """(numpy array, raw ggml type or None) for ``t`` in ``out_type``."""
    gguf = gguf_module()
    t = t.detach().float().cpu().contiguous()
    if out_type == "f32":
        return t.numpy(), None
    if out_type == "f16":
        return t.to(torch.float16).numpy(), None
    if out_type == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    raise GGUFExportError(f"outtype={out_type!r} is not supported; expected one of {list(OUT_TYPES)}")


def _write(path: str | os.PathLike, arch: str, kv: list[tuple[Any, ...]],
           tensors: Mapping[str, tuple[np.ndarray, Any]]) -> None:
    """Write one GGUF file atomically. kv: (kind, *args) for the GGUFWriter call ``add_<kind>(*args)``."""
    gguf = gguf_module()

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch=arch)
        for kind, *args in kv:
            getattr(w, f"add_{kind}")(*args)
        for name, (array, raw) in tensors.items():
            w.add_tensor(name, array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(os.fspath(path), write)


# ------------------------------------------------------------------------------------ the adapter
def adapter_gguf_tensors(model: nn.Module, adapter_name: str = "default",
                         alpha: float | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """(file alpha, GGUF tensor name -> fp32 tensor in llama.cpp's orientation) for an adapter, each
    module's scale correction folded into its B (see the module docstring)."""
    config = model.config
    name_map = _name_map(config)
    factors = lora_factors(model, adapter_name)
    file_alpha = float(adapter_configs(model)[adapter_name].alpha if alpha is None else alpha)
    out: dict[str, torch.Tensor] = {}
    for f in factors:
        target = gguf_name(name_map, f.module + ".weight")
        rank = f.a.shape[0]
        correction = f.scale / llama_cpp_scale(file_alpha, rank)
        b = f.b if correction == 1.0 else f.b * correction
        if f.embedding:
            if getattr(config, "tie_word_embeddings", False):
                raise GGUFExportError(
                    f"{f.module}: LoRA on a tied embedding; llama.cpp would also apply it to the output head"
                )
            if target != "token_embd.weight":
                raise GGUFExportError(f"{f.module}: an embedding LoRA maps to {target}, not token_embd")
            out[target + ".lora_a"], out[target + ".lora_b"] = f.a.t().contiguous(), b.contiguous()
            continue
        if target == "output.weight" and getattr(config, "tie_word_embeddings", False):
            raise GGUFExportError(
                f"{f.module}: LoRA on a tied lm_head; llama.cpp's base has no output tensor to adapt"
            )
        heads = _rope_heads(config, target)
        if heads is not None:
            b = rope_permute(b, heads)
        out[target + ".lora_a"], out[target + ".lora_b"] = f.a.contiguous(), b.contiguous()
    return file_alpha, out


def export_adapter_gguf(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                        out_type: str = "f32") -> dict[str, Any]:
    """Write adapter ``adapter_name`` of ``model`` (a Llama with the adapter loaded) as a llama.cpp
    LoRA GGUF at ``path``. Returns a summary (arch, alpha, number of pairs, tensor type)."""
    gguf = gguf_module()
    arch = llama_arch(model.config)
    alpha, tensors = adapter_gguf_tensors(model, adapter_name)
    kv = [
        ("string", gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER),
        ("string", gguf.Keys.Adapter.TYPE, "lora"),
        ("float32", gguf.Keys.Adapter.LORA_ALPHA, alpha),
        ("string", gguf.Keys.General.NAME, f"lorakit adapter {adapter_name}"),
    ]
    _write(path, arch, kv, {k: _encode(v, out_type) for k, v in tensors.items()})
    return {"arch": arch, "alpha": alpha, "pairs": len(tensors) // 2, "outtype": out_type}


# ------------------------------------------------------------------------------- the merged model
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}


def model_hparams(config: Any, arch: str) -> list[tuple[str, str, Any]]:
    """llama.cpp's hyper-parameter keys for a Llama config (as convert_hf_to_gguf writes them)."""
    gguf = gguf_module()
    K = gguf.Keys
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    n_kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = _head_dim(config)
    kv = [
        ("uint32", K.LLM.VOCAB_SIZE, int(config.vocab_size)),
        ("uint32", K.LLM.CONTEXT_LENGTH, int(config.max_position_embeddings)),
        ("uint32", K.LLM.EMBEDDING_LENGTH, int(config.hidden_size)),
        ("uint32", K.LLM.BLOCK_COUNT, int(config.num_hidden_layers)),
        ("uint32", K.LLM.FEED_FORWARD_LENGTH, int(config.intermediate_size)),
        ("uint32", K.Attention.HEAD_COUNT, int(config.num_attention_heads)),
        ("uint32", K.Attention.HEAD_COUNT_KV, n_kv),
        ("float32", K.Attention.LAYERNORM_RMS_EPS, float(config.rms_norm_eps)),
        ("uint32", K.Rope.DIMENSION_COUNT, head_dim),
        ("float32", K.Rope.FREQ_BASE, theta),
    ]
    if head_dim * int(config.num_attention_heads) != int(config.hidden_size):
        kv += [("uint32", K.Attention.KEY_LENGTH, head_dim), ("uint32", K.Attention.VALUE_LENGTH, head_dim)]
    return [(kind, key.format(arch=arch), value) for kind, key, value in kv]


def merged_gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 tensor for a plain (merged) Llama, q/k rows permuted for llama.cpp."""
    config = model.config
    name_map = _name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if any(p in hf_name for p in ("lora_", ".base.", "base_layer")):
            raise GGUFExportError(f"{hf_name}: the model still holds adapter layers; merge (unload) it first")
        target = gguf_name(name_map, hf_name)
        heads = _rope_heads(config, target)
        t = t.detach().float().cpu()
        out[target] = rope_permute(t, heads) if heads is not None else t
    return out


def export_merged_gguf(model: nn.Module, path: str | os.PathLike, out_type: str = "f32",
                       vocab: list[tuple[Any, ...]] | None = None,
                       name: str = "lorakit merged model") -> dict[str, Any]:
    """Write a plain (adapter-merged) Llama as a full llama.cpp model GGUF. Norms stay f32 (as
    llama.cpp's converter keeps 1-D tensors). ``vocab``: tokenizer keys from ``lorakit.io.gguf_vocab``
    (None: llama.cpp's "none" vocabulary, token ids only)."""
    from lorakit.io.gguf_vocab import no_vocab

    gguf = gguf_module()
    arch = llama_arch(model.config)
    tensors = merged_gguf_tensors(model)
    if out_type not in _FILE_TYPES:
        raise GGUFExportError(f"outtype={out_type!r} is not supported; expected one of {list(OUT_TYPES)}")
    kv = [
        ("string", gguf.Keys.General.TYPE, gguf.GGUFType.MODEL),
        ("string", gguf.Keys.General.NAME, name),
        ("uint32", gguf.Keys.General.FILE_TYPE, int(getattr(gguf.LlamaFileType, _FILE_TYPES[out_type]))),
        *model_hparams(model.config, arch),
        *(no_vocab(model.config) if vocab is None else vocab),
    ]
    encoded = {k: _encode(v, out_type if v.dim() > 1 else "f32") for k, v in tensors.items()}
    _write(path, arch, kv, encoded)
    return {"arch": arch, "tensors": len(tensors), "outtype": out_type}


# ----------------------------------------------------------------------------------- from files
def export_gguf(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                merged: bool = False, adapter_name: str = "default", out_type: str = "f32") -> dict[str, Any]:
    """``lorakit export --format gguf``: build the base (``model``, default the adapter's
    ``base_model_name_or_path``), load the adapter, and write the adapter GGUF, or with ``merged`` the
    merged model GGUF. Returns the writer's summary plus the base model name."""
    from lorakit.io.adapter_files import load_adapter, read_adapter
    from lorakit.models.builtin import build_model
    from lorakit.surgery.merge import unload

    gguf_module()
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"outtype={out_type!r} is not supported; expected one of {list(OUT_TYPES)}")
    _, meta, _ = read_adapter(adapter, adapter_name)
    base = model or meta.get("base_model_name_or_path")
    if not base:
        raise GGUFExportError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass --model")
    net = build_model(base, task="causal-lm")
    llama_arch(net.config)
    load_adapter(net, adapter, adapter_name)
    if merged:
        from lorakit.io.gguf_vocab import vocab_for

        vocab, what = vocab_for(base, net.config)
        summary = {**export_merged_gguf(unload(net, merge=True), out, out_type, vocab=vocab), "vocab": what}
    else:
        summary = export_adapter_gguf(net, out, adapter_name, out_type)
    return {**summary, "base": base}
