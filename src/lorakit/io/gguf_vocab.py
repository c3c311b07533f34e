"""Vocabularies for a merged-model GGUF (``lorakit.io.gguf_export``), in llama.cpp's tokenizer keys.

- ``byte_vocab``: lorakit's byte tokenizer (the builtin models'), as SentencePiece-style byte tokens;
- ``hf_vocab``: a Hugging Face byte-level BPE tokenizer (``tokenizer.json`` as GPT-2 / Llama 3 write it),
  through the ``gguf`` package's own readers (``BpeVocab``, ``SpecialVocab``), when it maps onto one of
  llama.cpp's pre-tokenizers without guessing; anything else raises ``GGUFVocabError`` naming why;
- ``no_vocab``: llama.cpp's "none" vocabulary (vocab_size dummy tokens): token-id inputs only.

``vocab_for`` picks one for a base model name and warns when it falls back to "none".
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from lorakit.io.gguf_export import GGUFExportError, gguf_module


class GGUFVocabError(GGUFExportError):
    """A tokenizer that lorakit cannot write as a llama.cpp vocabulary without changing what it does."""


def byte_vocab(config: Any) -> list[tuple[Any, ...]]:
    """A SentencePiece-style ("llama") vocabulary for lorakit's byte tokenizer: ids 0-255 are the
    bytes (<0xNN>, BYTE type), then pad / bos / eos as control tokens, any further id unused."""
    gguf = gguf_module()
    from lorakit.models.builtin import BOS_ID, EOS_ID, PAD_ID

    n = int(config.vocab_size)
    if n < EOS_ID + 1:
        raise GGUFExportError(f"vocab_size={n} is smaller than lorakit's byte tokenizer ({EOS_ID + 1} ids)")
    special = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}
    tokens = [f"<0x{i:02X}>" if i < 256 else special.get(i, f"<unused{i}>") for i in range(n)]
    T = gguf.TokenType
    types = [int(T.BYTE) if i < 256 else int(T.CONTROL if i in special else T.UNUSED) for i in range(n)]
    K = gguf.Keys.Tokenizer
    return [
        ("string", K.MODEL, "llama"),
        ("array", K.LIST, tokens),
        ("array", K.SCORES, [0.0] * n),
        ("array", K.TOKEN_TYPE, types),
        ("uint32", K.BOS_ID, BOS_ID),
        ("uint32", K.EOS_ID, EOS_ID),
        ("uint32", K.PAD_ID, PAD_ID),
        ("uint32", K.UNK_ID, PAD_ID),
        ("bool", K.ADD_BOS, False),
        ("bool", K.ADD_PREFIX, False),
    ]




def no_vocab(config: Any) -> list[tuple[Any, ...]]:
    """No tokenizer (llama.cpp's "none" vocabulary of vocab_size dummy tokens): token-id inputs only."""
    K = gguf_module().Keys
    return [("string", K.Tokenizer.MODEL, "none")]




# tokenizer.json pre_tokenizer -> llama.cpp's tokenizer.ggml.pre. Only the plain GPT-2 byte-level split is
# mapped: llama.cpp's "gpt-2" pre-tokenizer uses the same regex (others would need their exact regex).
def _pre_tokenizer(tok: dict[str, Any], source: str) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise GGUFVocabError(f"{source}: pre_tokenizer {json.dumps(pre)[:120]} has no exact llama.cpp pre-tokenizer here")


def hf_vocab(model_dir: str | os.PathLike, config: Any) -> list[tuple[Any, ...]]:
    """The tokenizer keys for a byte-level BPE ``tokenizer.json`` in ``model_dir`` (tokens, types,
    merges, special ids, add-bos/eos flags), padded with unused tokens up to ``config.vocab_size``."""
    gguf = gguf_module()
    from gguf.vocab import BpeVocab, SpecialVocab

    path = Path(model_dir)
    source = str(path / "tokenizer.json")
    if not (path / "tokenizer.json").is_file():
        raise GGUFVocabError(f"{model_dir}: no tokenizer.json")
    with open(path / "tokenizer.json", encoding="utf-8") as f:
        tok = json.load(f)
    if tok.get("normalizer"):
        raise GGUFVocabError(f"{source}: a normalizer ({tok['normalizer'].get('type')}) is not exported")
    pre = _pre_tokenizer(tok, source)
    try:
        bpe = BpeVocab(path)
    except (FileNotFoundError, ValueError) as e:
        raise GGUFVocabError(f"{source}: not a byte-level BPE tokenizer llama.cpp reads ({e})") from None
    tokens, types = [], []
    for text, _score, kind in bpe.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(int(kind))
    n = int(config.vocab_size)
    if len(tokens) > n:
        raise GGUFVocabError(f"{source}: {len(tokens)} tokens, more than the model's vocab_size {n}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n)]
    types += [int(gguf.TokenType.UNUSED)] * (n - len(types))
    special = SpecialVocab(path, load_merges=True, n_vocab=n)
    if not special.merges:
        raise GGUFVocabError(f"{source}: no BPE merges found")
    kv: list[tuple[Any, ...]] = [
        ("tokenizer_model", "gpt2"), ("tokenizer_pre", pre), ("token_list", tokens), ("token_types", types),
        ("token_merges", special.merges),
    ]
    kv += [(f"{typ}_token_id", tid) for typ, tid in special.special_token_ids.items()]
    kv += [(f"add_{typ}_token", flag) for typ, flag in special.add_special_token.items()]
    return [k for k in kv if hasattr(gguf.GGUFWriter, f"add_{k[0]}")]


def vocab_for(base: str, config: Any) -> tuple[list[tuple[Any, ...]], str]:
    """(tokenizer keys, what they are) for base model ``base``: the byte tokenizer for a builtin, the
    HF tokenizer where ``hf_vocab`` maps it, else llama.cpp's "none" vocabulary with a warning."""
    from lorakit.models.builtin import BUILTIN_SPECS, resolve_model_path

    if base in BUILTIN_SPECS:
        return byte_vocab(config), "lorakit byte tokenizer"
    folder = resolve_model_path(base)
    try:
        return hf_vocab(folder or base, config), "Hugging Face BPE tokenizer"
    except GGUFVocabError as e:
        warnings.warn(f"{e}; the GGUF gets llama.cpp's 'none' vocabulary: feed it token ids", stacklevel=2)
        return no_vocab(config), "none (token ids)"
