"""Transformer families as data: one :class:`Family` per layout, the one place that knows a family's
config keys, module names, block container and heads.

The planner reads shapes from a config with it (``lorakit.planner.arch``), names each linear weight, groups
the weights that read the same input (``lorakit.planner.cost``) and names attention targets
(``lorakit.planner.advice``); sharded training finds a model's decoder blocks with :func:`decoder_blocks`.

Module names are paths inside one block, as Hugging Face names them; a task model (``...ForCausalLM``,
``...ForSequenceClassification``) holds the base model at ``backbone``, whose blocks sit at ``blocks``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

# (config key or None, default): the key's value when the config has it (not None), else the default
Setting = tuple[str | None, Any]


@dataclass(frozen=True)
class Family:
    """One transformer layout. Config keys are tried in order; the first the config holds wins."""

    name: str  # "llama" (pre-RMSNorm, gated SiLU MLP, RoPE), "gpt2", "gpt" (GPT-3 style) or "bert"
    # shapes: config keys
    hidden: tuple[str, ...]
    layers: tuple[str, ...]
    heads: tuple[str, ...]
    intermediate: tuple[str, ...]
    vocab: tuple[str, ...] = ("vocab_size",)
    kv_heads: tuple[str, ...] = ()  # () or absent: as many as heads (no grouped-query attention)
    head_dim: tuple[str, ...] = ()  # () or absent: hidden // heads
    positions: tuple[str, ...] = ()  # learned position embeddings; (): rotary, no parameters
    token_types: Setting = (None, 0)  # BERT's token-type embeddings
    mlp_ratio: int | None = None  # intermediate = mlp_ratio x hidden when the config leaves it out
    # settings read from the config, with their defaults
    tied: Setting = (None, True)
    qkv_bias: Setting = (None, True)
    o_bias: Setting = (None, True)
    mlp_bias: Setting = (None, True)
    dropout: Setting = (None, 0.0)  # hidden / residual dropout
    attn_dropout: Setting = (None, 0.0)
    # structure
    gated: bool = False  # gated MLP: down(act(gate(x)) * up(x))
    rms_norm: bool = False  # RMSNorm (weight only) instead of LayerNorm (weight and bias)
    causal: bool = True
    encoder: bool = False  # post-norm encoder: an embeddings norm and no final norm, a pooler
    # modules: paths inside one block; q, k, v the same path for a fused projection (GPT-2's c_attn)
    q: str = ""
    k: str = ""
    v: str = ""
    o: str = ""
    mlp_in: tuple[str, ...] = ()  # the MLP's input projections (gate and up, or fc1)
    mlp_out: str = ""
    # where the blocks are, and the heads of each task
    backbone: str = ""  # attribute of a task model holding the base model
    blocks: str = ""  # the blocks' container inside the base model
    lm_head: str = "lm_head"
    lm_head_bias: bool = False
    lm_transform: str | None = None  # BERT's LM-head dense + LayerNorm before the decoder
    classifier: str = "score"
    classifier_bias: bool = False
    pooler: str | None = None  # inside the base model

    @property
    def attention(self) -> tuple[str, ...]:
        """The attention projections of a block (a fused q/k/v once)."""
        return tuple(dict.fromkeys((self.q, self.k, self.v, self.o)))

    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """A block's linears by the input they read: q/k/v (one input), the attention output, the MLP
        input projections, the MLP output."""
        return (tuple(dict.fromkeys((self.q, self.k, self.v))), (self.o,), self.mlp_in, (self.mlp_out,))

    def group_of(self, name: str) -> int | None:
        """The index in :attr:`groups` of the block linear ``name`` ends with (the longest such path:
        BERT's ``attention.output.dense`` is not its ``output.dense``), or None for other modules."""
        best: tuple[int, int] | None = None
        for g, paths in enumerate(self.groups):
            for p in paths:
                if (name == p or name.endswith("." + p)) and (best is None or len(p) > best[1]):
                    best = (g, len(p))
        return None if best is None else best[0]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, in model order."""
        return (*self.attention, *self.mlp_in, self.mlp_out)

    @property
    def head_names(self) -> tuple[str, ...]:
        """The output heads of the task models (never adapted as if they were blocks)."""
        return (self.lm_head, self.classifier)

    def short_name(self, path: str) -> str:
        """The shortest ending of a block path that names no other linear of the block:
        ``self_attn.q_proj`` -> ``q_proj``, GPT-2's ``attn.c_proj`` stays (``mlp.c_proj`` ends alike)."""
        parts = path.split(".")
        for i in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[i:])
            if sum(1 for p in self.linears if p == tail or p.endswith("." + tail)) == 1:
                return tail
        return path

    def prefixes(self, task: str) -> tuple[str, str]:
        """(module name prefix of block i, prefix of the base model's own modules) in the model of
        ``task``: the base model itself for "base", else a task model holding it at ``backbone``."""
        root = "" if task == "base" else self.backbone + "."
        return f"{root}{self.blocks}.{{i}}.", root


LLAMA = Family(
    "llama",
    hidden=("hidden_size",),
    layers=("num_hidden_layers",),
    heads=("num_attention_heads",),
    intermediate=("intermediate_size",),
    kv_heads=("num_key_value_heads",),
    head_dim=("head_dim",),
    tied=("tie_word_embeddings", False),
    qkv_bias=("attention_bias", False),
    o_bias=("attention_bias", False),
    mlp_bias=("mlp_bias", False),
    attn_dropout=("attention_dropout", 0.0),
    gated=True,
    rms_norm=True,
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    backbone="model",
    blocks="layers",
)
GPT2 = Family(
    "gpt2",
    hidden=("hidden_size", "n_embd"),
    layers=("num_hidden_layers", "n_layer"),
    heads=("num_attention_heads", "n_head"),
    intermediate=("n_inner",),
    mlp_ratio=4,
    positions=("n_positions", "max_position_embeddings"),
    dropout=("resid_pdrop", 0.1),
    attn_dropout=("attn_pdrop", 0.1),
    q="attn.c_attn",
    k="attn.c_attn",
    v="attn.c_attn",
    o="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    backbone="transformer",
    blocks="h",
)
GPT = Family(  # GPT-3 style with separate q/k/v (the 175B reference shape)
    "gpt",
    hidden=("hidden_size",),
    layers=("num_hidden_layers",),
    heads=("num_attention_heads",),
    intermediate=("intermediate_size",),
    positions=("max_position_embeddings",),
    tied=("tie_word_embeddings", True),
    dropout=("hidden_dropout", 0.0),
    attn_dropout=("attention_dropout", 0.0),
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    mlp_in=("fc1",),
    mlp_out="fc2",
    backbone="model",
    blocks="layers",
)
BERT = Family(
    "bert",
    hidden=("hidden_size",),
    layers=("num_hidden_layers",),
    heads=("num_attention_heads",),
    intermediate=("intermediate_size",),
    positions=("max_position_embeddings",),
    token_types=("type_vocab_size", 2),
    dropout=("hidden_dropout_prob", 0.1),
    attn_dropout=("attention_probs_dropout_prob", 0.1),
    causal=False,
    encoder=True,
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    backbone="bert",
    blocks="encoder.layer",
    lm_head="cls.predictions.decoder",
    lm_head_bias=True,
    lm_transform="cls.predictions.transform.dense",
    classifier="classifier",
    classifier_bias=True,
    pooler="pooler.dense",
)

# Hugging Face model_type -> family. Qwen2 is a Llama whose q/k/v carry a bias unless the config says not.
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": dataclasses.replace(LLAMA, qkv_bias=("attention_bias", True)),
    "gpt2": GPT2,
    "bert": BERT,
    "gpt": GPT,
}
_BY_NAME = {f.name: f for f in (LLAMA, GPT2, GPT, BERT)}
HEAD_NAMES = tuple(dict.fromkeys(n for f in _BY_NAME.values() for n in f.head_names))
# Top-level module names of output / task heads across Hugging Face models (the families above and
# others: GPT-NeoX's embed_out, InternLM's output, question answering's qa_outputs). The one list that
# target selection (not in all-linear), quantization (kept full precision) and loading (created fresh on
# a base checkpoint) read.
TASK_HEADS = ("lm_head", "embed_out", "output", "score", "classifier", "cls", "qa_outputs")


def family_named(name: str) -> Family:
    """The family called ``name`` ("llama", "gpt2", "gpt", "bert")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_BY_NAME)}") from None


def family_of(model_type: str | None) -> Family:
    """The family of a Hugging Face ``model_type``; ``ValueError`` naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not a known family; known: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (task model or base model), in order:
    the units to shard or checkpoint one by one. ``ValueError`` for a model of no known family."""
    config = getattr(model, "config", None)
    family = family_of(getattr(config, "model_type", None))
    for path in (f"{family.backbone}.{family.blocks}", family.blocks):
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        return list(container)
    raise ValueError(
        f"{type(model).__name__} ({family.name} family) has neither {family.backbone}.{family.blocks} "
        f"nor {family.blocks}"
    )
