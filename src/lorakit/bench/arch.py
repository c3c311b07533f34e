"""Architecture shapes and parameter counts for the planner, computed from a config (no weights).

A model is described by an :class:`Arch` read from a Hugging Face config (a local directory's
``config.json``, a builtin's config, or a reference shape named by its size such as ``"7B"``).
Parameter counts are summed tensor by tensor (embeddings, attention with grouped-query heads, gated
or plain MLP, norms, biases, tied embeddings, task heads) and must equal what ``transformers``
instantiates; tests check this on every builtin.

Reference shapes for sizes like "7B" are in :mod:`lorakit.bench.ref_sizes`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from lorakit.bench.ref_sizes import ALIASES, REFERENCE_SIZES
from lorakit.surgery.targets import ModuleInfo

FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "gpt": "gpt",
}
TASKS = ("causal-lm", "classification", "base")


class PlanError(ValueError):
    """A planner input is invalid, or the plan is impossible (e.g. the model fits on no GPU)."""


@dataclass(frozen=True)
class Arch:
    """The shapes that decide parameter count, FLOPs and activation memory of a transformer.

    ``family`` is one of "llama" (pre-RMSNorm, gated SiLU MLP, RoPE), "gpt2" (fused qkv Conv1D,
    LayerNorm, GELU), "bert" (post-LayerNorm encoder) or "gpt" (GPT-3 style with separate q/k/v).
    """

    name: str
    family: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int = 0  # learned position embeddings (0: rotary, no parameters)
    type_vocab: int = 0  # BERT token-type embeddings
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0  # hidden/residual dropout in training
    attn_dropout: float = 0.0
    causal: bool = True
    task: str = "causal-lm"
    num_labels: int = 2

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.family == "llama"


@dataclass(frozen=True)
class Matrix:
    """One linear weight: full module name, input and output features, and whether it has a bias."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    layer: int | None  # transformer block index, None outside the blocks

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


def arch_from_config(
    cfg: dict[str, Any], name: str = "model", task: str | None = None, num_labels: int = 2
) -> Arch:
    """An :class:`Arch` from a Hugging Face config dict (``config.to_dict()`` or ``config.json``)."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise PlanError(
            f"{name}: model_type={mt!r} is not supported by the planner; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[mt]
    task = task or ("base" if family == "bert" else "causal-lm")
    if task not in TASKS:
        raise PlanError(f"task={task!r} is not supported; expected one of {list(TASKS)}")

    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is None:
            raise PlanError(f"{name}: config has none of the fields {list(keys)}")
        return default

    h = int(get("hidden_size", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    common = dict(
        name=name,
        family=family,
        vocab=int(get("vocab_size")),
        hidden=h,
        layers=int(get("num_hidden_layers", "n_layer")),
        heads=heads,
        task=task,
        num_labels=int(num_labels),
    )
    if family == "llama":
        arch = Arch(
            **common,
            intermediate=int(get("intermediate_size")),
            kv_heads=int(get("num_key_value_heads", default=heads)),
            head_dim=int(get("head_dim", default=h // heads)),
            tied=bool(get("tie_word_embeddings", default=False)),
            qkv_bias=bool(get("attention_bias", default=mt == "qwen2")),
            o_bias=bool(get("attention_bias", default=False)),
            mlp_bias=bool(get("mlp_bias", default=False)),
            attn_dropout=float(get("attention_dropout", default=0.0)),
        )
    elif family == "gpt2":
        arch = Arch(
            **common,
            intermediate=int(get("n_inner", default=4 * h)),
            kv_heads=heads,
            head_dim=h // heads,
            max_positions=int(get("n_positions", "max_position_embeddings")),
            tied=True,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            dropout=float(get("resid_pdrop", default=0.1)),
            attn_dropout=float(get("attn_pdrop", default=0.1)),
        )
    elif family == "gpt":
        arch = Arch(
            **common,
            intermediate=int(get("intermediate_size")),
            kv_heads=heads,
            head_dim=h // heads,
            max_positions=int(get("max_position_embeddings")),
            tied=bool(get("tie_word_embeddings", default=True)),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            dropout=float(get("hidden_dropout", default=0.0)),
            attn_dropout=float(get("attention_dropout", default=0.0)),
        )
    else:  # bert
        arch = Arch(
            **common,
            intermediate=int(get("intermediate_size")),
            kv_heads=heads,
            head_dim=h // heads,
            max_positions=int(get("max_position_embeddings")),
            type_vocab=int(get("type_vocab_size", default=2)),
            tied=True,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            causal=False,
            dropout=float(get("hidden_dropout_prob", default=0.1)),
            attn_dropout=float(get("attention_probs_dropout_prob", default=0.1)),
        )
    for field_name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"):
        if getattr(arch, field_name) <= 0:
            raise PlanError(f"{name}: {field_name}={getattr(arch, field_name)} must be a positive integer")
    return arch


def _load_config_dir(path: str) -> dict[str, Any]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise PlanError(f"model directory {path!r} has no config.json")
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except ImportError:  # pragma: no cover - fall back to the raw file without transformers
        with open(cfg_file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, KeyError):
        with open(cfg_file, encoding="utf-8") as f:
            return json.load(f)


def resolve_arch(model: str | Arch, task: str | None = None, num_labels: int = 2) -> Arch:
    """An :class:`Arch` from a builtin name, a local HF model directory or a size like ``"7B"``."""
    if isinstance(model, Arch):
        return model if task is None else replace(model, task=task)
    from lorakit.models.builtin import BUILTIN_SPECS, minilm_path

    if not isinstance(model, str) or not model.strip():
        raise PlanError(f"model={model!r}: expected a builtin name, a model directory or a size like '7B'")
    size = model.strip().upper()
    size = ALIASES.get(size, size)
    if size in REFERENCE_SIZES:
        ref_name, cfg = REFERENCE_SIZES[size]
        return arch_from_config(cfg, name=ref_name, task=task, num_labels=num_labels)
    if re.fullmatch(r"-?[0-9.]+\s*[KMBT]?", size):
        if re.fullmatch(r"-?0*\.?0*\s*[KMBT]?", size) or size.startswith("-"):
            raise PlanError(f"model={model!r}: a model size must be positive")
        raise PlanError(
            f"model={model!r}: no reference architecture for this size; known sizes: {list(REFERENCE_SIZES)} "
            "(or give a model directory with config.json)"
        )
    if model in BUILTIN_SPECS:
        from lorakit.models.builtin import builtin_config

        return arch_from_config(builtin_config(model).to_dict(), name=model, task=task, num_labels=num_labels)
    if model == "minilm":
        return arch_from_config(_load_config_dir(minilm_path()), name=model, task=task, num_labels=num_labels)
    if os.path.isdir(model):
        return arch_from_config(
            _load_config_dir(model),
            name=os.path.basename(os.path.normpath(model)),
            task=task,
            num_labels=num_labels,
        )
    raise PlanError(
        f"model={model!r} is neither a builtin ({list(BUILTIN_SPECS) + ['minilm']}), an existing model directory, "
        f"nor a known size ({list(REFERENCE_SIZES)})"
    )


def _prefixes(a: Arch) -> tuple[str, str]:
    """(module name prefix of block i, prefix of top-level backbone modules) for the task's HF class."""
    if a.family in ("llama", "gpt"):
        root = "" if a.task == "base" else "model."
        return root + "layers.{i}.", root
    if a.family == "gpt2":
        root = "" if a.task == "base" else "transformer."
        return root + "h.{i}.", root
    root = "" if a.task == "base" else "bert."
    return root + "encoder.layer.{i}.", root


def matrices(a: Arch) -> list[Matrix]:
    """Every linear weight of the model with its full module name, in model order."""
    block, root = _prefixes(a)
    h, i, q, kv = a.hidden, a.intermediate, a.q_dim, a.kv_dim
    if a.family == "llama":
        per_layer = [
            ("self_attn.q_proj", h, q, a.qkv_bias),
            ("self_attn.k_proj", h, kv, a.qkv_bias),
            ("self_attn.v_proj", h, kv, a.qkv_bias),
            ("self_attn.o_proj", q, h, a.o_bias),
            ("mlp.gate_proj", h, i, a.mlp_bias),
            ("mlp.up_proj", h, i, a.mlp_bias),
            ("mlp.down_proj", i, h, a.mlp_bias),
        ]
    elif a.family == "gpt":
        per_layer = [
            ("self_attn.q_proj", h, q, True),
            ("self_attn.k_proj", h, q, True),
            ("self_attn.v_proj", h, q, True),
            ("self_attn.out_proj", q, h, True),
            ("fc1", h, i, True),
            ("fc2", i, h, True),
        ]
    elif a.family == "gpt2":
        per_layer = [
            ("attn.c_attn", h, 3 * h, True),
            ("attn.c_proj", h, h, True),
            ("mlp.c_fc", h, i, True),
            ("mlp.c_proj", i, h, True),
        ]
    else:
        per_layer = [
            ("attention.self.query", h, h, True),
            ("attention.self.key", h, h, True),
            ("attention.self.value", h, h, True),
            ("attention.output.dense", h, h, True),
            ("intermediate.dense", h, i, True),
            ("output.dense", i, h, True),
        ]
    out = [
        Matrix(block.format(i=n) + s, d_in, d_out, b, n)
        for n in range(a.layers)
        for s, d_in, d_out, b in per_layer
    ]
    if a.family == "bert":
        if a.task in ("base", "classification"):
            out.append(Matrix(root + "pooler.dense", h, h, True, None))
        if a.task == "classification":
            out.append(Matrix("classifier", h, a.num_labels, True, None))
        elif a.task == "causal-lm":
            out.append(Matrix("cls.predictions.transform.dense", h, h, True, None))
            out.append(
                Matrix("cls.predictions.decoder", h, a.vocab, True, None)
            )  # weight tied, bias counted apart
    elif a.task == "causal-lm":
        out.append(Matrix("lm_head", h, a.vocab, False, None))
    elif a.task == "classification":
        out.append(Matrix("score", h, a.num_labels, False, None))
    return out


HEADS = ("lm_head", "score", "classifier", "cls.predictions.decoder")


def module_infos(a: Arch) -> list[ModuleInfo]:
    """The linear modules as :class:`lorakit.surgery.targets.ModuleInfo`, for target matching."""
    return [ModuleInfo(m.name, "linear", "Linear") for m in matrices(a)]


@dataclass(frozen=True)
class ParamCount:
    """Parameters by group; ``total`` equals ``sum(p.numel() for p in model.parameters())``."""

    embeddings: int  # token (+ position, token-type) embeddings
    attention: int
    mlp: int
    norms: int
    head: int  # untied output head / classifier / pooler / BERT LM transform
    total: int
    matmul: int  # weights that take part in a matmul per token (incl. a tied output head): the N of 6N
    quantizable: int  # linear weights inside the blocks (what QLoRA stores in NF4)


def count_params(a: Arch) -> ParamCount:
    """Exact parameter count of the architecture (what ``transformers`` instantiates)."""
    h = a.hidden
    emb = a.vocab * h + a.max_positions * h + a.type_vocab * h
    mats = matrices(a)
    blocks = [m for m in mats if m.layer is not None]
    attn = sum(m.params for m in blocks if "attn" in m.name or "attention" in m.name)
    mlp = sum(m.params for m in blocks) - attn
    rms = a.family == "llama"
    per_norm = h if rms else 2 * h
    norms = a.layers * 2 * per_norm
    if a.family == "bert":
        norms += per_norm  # embeddings LayerNorm (post-norm encoder: no final norm)
    else:
        norms += per_norm  # final norm
    head = 0
    for m in mats:
        if m.layer is not None:
            continue
        if m.name.endswith("cls.predictions.decoder"):
            head += a.vocab  # decoder weight tied to the word embeddings; its bias is a parameter
        elif m.name == "lm_head" and a.tied:
            continue
        else:
            head += m.params
    if a.family == "bert" and a.task == "causal-lm":
        norms += per_norm  # LM-head transform LayerNorm
    total = emb + attn + mlp + norms + head
    matmul = sum(m.d_in * m.d_out for m in mats)
    quantizable = sum(m.d_in * m.d_out for m in blocks)
    return ParamCount(emb, attn, mlp, norms, head, total, matmul, quantizable)
