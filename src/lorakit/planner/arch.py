"""Architecture shapes and parameter counts for the planner, computed from a config (no weights).

A model is described by an :class:`Arch` read from a Hugging Face config (a local directory's
``config.json``, a builtin's config, or a reference shape named by its size such as ``"7B"``).
Parameter counts are summed tensor by tensor (embeddings, attention with grouped-query heads, gated
or plain MLP, norms, biases, tied embeddings, task heads) and must equal what ``transformers``
instantiates; tests check this on every builtin.

Reference shapes for sizes like "7B" are in :mod:`lorakit.planner.ref_sizes`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from lorakit.models.families import FAMILIES, HEAD_NAMES, Family, Setting, family_named
from lorakit.planner.ref_sizes import ALIASES, REFERENCE_SIZES
from lorakit.surgery.targets import ModuleInfo

TASKS = ("causal-lm", "classification", "base")


class PlanError(ValueError):
    """A planner input is invalid, or the plan is impossible (e.g. the model fits on no GPU)."""


@dataclass(frozen=True)
class Arch:
    """The shapes that decide parameter count, FLOPs and activation memory of a transformer.

    ``family`` names a :class:`lorakit.models.families.Family`: "llama" (pre-RMSNorm, gated SiLU MLP,
    RoPE), "gpt2" (fused qkv Conv1D, LayerNorm, GELU), "bert" (post-LayerNorm encoder) or "gpt" (GPT-3
    style with separate q/k/v).
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
    def layout(self) -> Family:
        """The family's module names and structure (``lorakit.models.families``)."""
        return family_named(self.family)

    @property
    def gated(self) -> bool:
        return self.layout.gated


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
    """An :class:`Arch` from a Hugging Face config dict (``config.to_dict()`` or ``config.json``), read
    with the keys of its family's table (``lorakit.models.families``)."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise PlanError(
            f"{name}: model_type={mt!r} is not supported by the planner; supported: {sorted(FAMILIES)}"
        )
    fam = FAMILIES[mt]
    task = task or ("base" if fam.encoder else "causal-lm")
    if task not in TASKS:
        raise PlanError(f"task={task!r} is not supported; expected one of {list(TASKS)}")

    def get(keys: tuple[str, ...], default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is None:
            raise PlanError(f"{name}: config has none of the fields {list(keys)}")
        return default

    def setting(s: Setting) -> Any:
        key, default = s
        return default if key is None else get((key,), default=default)

    h = int(get(fam.hidden))
    heads = int(get(fam.heads))
    arch = Arch(
        name=name,
        family=fam.name,
        vocab=int(get(fam.vocab)),
        hidden=h,
        intermediate=int(get(fam.intermediate, default=fam.mlp_ratio and fam.mlp_ratio * h)),
        layers=int(get(fam.layers)),
        heads=heads,
        kv_heads=int(get(fam.kv_heads, default=heads)),
        head_dim=int(get(fam.head_dim, default=h // heads)),
        max_positions=int(get(fam.positions)) if fam.positions else 0,
        type_vocab=int(setting(fam.token_types)),
        tied=bool(setting(fam.tied)),
        qkv_bias=bool(setting(fam.qkv_bias)),
        o_bias=bool(setting(fam.o_bias)),
        mlp_bias=bool(setting(fam.mlp_bias)),
        dropout=float(setting(fam.dropout)),
        attn_dropout=float(setting(fam.attn_dropout)),
        causal=fam.causal,
        task=task,
        num_labels=int(num_labels),
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


def matrices(a: Arch) -> list[Matrix]:
    """Every linear weight of the model with its full module name, in model order."""
    fam = a.layout
    block, root = fam.prefixes(a.task)
    h, i = a.hidden, a.intermediate
    if fam.fused_qkv:  # GPT-2's c_attn: q, k and v in one (h, q + 2 kv) projection
        qkv = [(fam.q, h, a.q_dim + 2 * a.kv_dim, a.qkv_bias)]
    else:
        qkv = [(fam.q, h, a.q_dim, a.qkv_bias)] + [(p, h, a.kv_dim, a.qkv_bias) for p in (fam.k, fam.v)]
    per_layer = [
        *qkv,
        (fam.o, a.q_dim, h, a.o_bias),
        *((m, h, i, a.mlp_bias) for m in fam.mlp_in),
        (fam.mlp_out, i, h, a.mlp_bias),
    ]
    out = [
        Matrix(block.format(i=n) + s, d_in, d_out, b, n)
        for n in range(a.layers)
        for s, d_in, d_out, b in per_layer
    ]
    if fam.pooler and a.task in ("base", "classification"):
        out.append(Matrix(root + fam.pooler, h, h, True, None))
    if a.task == "classification":
        out.append(Matrix(fam.classifier, h, a.num_labels, fam.classifier_bias, None))
    elif a.task == "causal-lm":
        if fam.lm_transform:
            out.append(Matrix(fam.lm_transform, h, h, True, None))
        out.append(Matrix(fam.lm_head, h, a.vocab, fam.lm_head_bias, None))  # BERT's: tied weight, own bias
    return out


HEADS = HEAD_NAMES  # the output heads of every family's task models


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
    fam = a.layout
    attn = sum(m.params for m in blocks if fam.group_of(m.name) in (0, 1))  # q/k/v and the output
    mlp = sum(m.params for m in blocks) - attn
    per_norm = h if fam.rms_norm else 2 * h
    norms = a.layers * 2 * per_norm
    # + the embeddings LayerNorm of a post-norm encoder (which has no final norm), or the final norm
    norms += per_norm
    head = 0
    for m in mats:
        if m.layer is not None:
            continue
        if m.name == fam.lm_head and fam.lm_head_bias:
            head += a.vocab  # BERT's decoder weight is tied to the word embeddings; its bias is a parameter
        elif m.name == fam.lm_head and a.tied:
            continue
        else:
            head += m.params
    if fam.lm_transform and a.task == "causal-lm":
        norms += per_norm  # LM-head transform LayerNorm
    total = emb + attn + mlp + norms + head
    matmul = sum(m.d_in * m.d_out for m in mats)
    quantizable = sum(m.d_in * m.d_out for m in blocks)
    return ParamCount(emb, attn, mlp, norms, head, total, matmul, quantizable)
