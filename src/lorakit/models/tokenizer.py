"""Tokenizers: lorakit's byte-level tokenizer for the builtin models, and loading a Hugging Face one.

The builtin random-init models (tiny-llama, tiny-gpt2, tiny-bert, llama-15m) have no trained vocabulary, so
they read UTF-8 bytes: ids 0-255 are the bytes, then ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258 and a
reserved ``<unk>`` 259 (vocabulary 260; see ``lorakit.models.builtin``). ``ByteTokenizer`` implements the
small subset of the Hugging Face tokenizer interface that lorakit uses, so the data code handles an HF
tokenizer and this one the same way:

- ``encode(text, text_pair=None, add_special_tokens=True) -> list[int]`` (specials: ``<s> text </s>``,
  and ``pair </s>`` after it for a pair);
- ``__call__(text, text_pair=None, truncation=False, max_length=None) -> {"input_ids", "attention_mask"}``;
- ``decode(ids, skip_special_tokens=False) -> str``;
- ``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ``vocab_size``, ``len()``;
- ``apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``.

Like HF tokenizers, the literal special-token strings ``<s>``, ``</s>`` and ``<pad>`` inside a text are
read as the special ids (that is how a chat template written as text carries ``</s>``).

Chat template of the byte tokenizer (documented here; it is what ``apply_chat_template`` renders)::

    <s><|system|>\\n{content}</s>\\n<|user|>\\n{content}</s>\\n<|assistant|>\\n{content}</s>\\n

one ``<|{role}|>\\n{content}</s>\\n`` block per message after a leading ``<s>``; the generation prompt
is ``<|assistant|>\\n``. Each rendered prefix of a conversation is a prefix of the full rendering, which
is what assistant-only loss masking relies on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lorakit.models import hub
from lorakit.models.builtin import BOS_ID, BUILTIN_SPECS, EOS_ID, PAD_ID, ModelError, model_source

UNK_ID = 259
BYTE_VOCAB_SIZE = 260
_SPECIAL_TEXT = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in _SPECIAL_TEXT))
_ID_TEXT = {v: k for k, v in _SPECIAL_TEXT.items()} | {UNK_ID: "<unk>"}


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or used as asked."""


@runtime_checkable
class Tokenizer(Protocol):
    """The part of a tokenizer lorakit's data code uses (satisfied by HF tokenizers and ByteTokenizer)."""

    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = True
    ) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def __call__(self, text: str, text_pair: str | None = None, **kwargs: Any) -> Mapping[str, Any]: ...


class ByteTokenizer:
    """UTF-8 byte tokenizer for the builtin models (ids 0-255 bytes, pad 256, bos 257, eos 258, unk 259)."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    unk_token_id = UNK_ID
    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    vocab_size = BYTE_VOCAB_SIZE
    padding_side = "right"
    chat_template = "byte-chat"  # a name, not Jinja: rendering is done in apply_chat_template
    name_or_path = "lorakit-byte"

    def __len__(self) -> int:
        return BYTE_VOCAB_SIZE

    def _text_ids(self, text: str) -> list[int]:
        """Bytes of ``text``, with the literal special-token strings read as their ids."""
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            ids.extend(text[pos : m.start()].encode("utf-8"))
            ids.append(_SPECIAL_TEXT[m.group(0)])
            pos = m.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (``<s> text </s>`` with specials; ``<s> text </s> pair </s>`` for a pair)."""
        if not isinstance(text, str):
            raise TokenizerError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._text_ids(text)
        if add_special_tokens:
            ids = [BOS_ID, *ids, EOS_ID]
        if text_pair is not None:
            ids += self._text_ids(text_pair) + ([EOS_ID] if add_special_tokens else [])
        return ids

    def __call__(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        **_: Any,
    ) -> dict[str, list[int]]:
        """HF-style call: ``{"input_ids", "attention_mask"}``; truncation keeps the final ``</s>``."""
        ids = self.encode(text, text_pair, add_special_tokens)
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [EOS_ID] if add_special_tokens else ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 and ids outside the byte vocabulary become U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for i in (int(t) for t in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if i in _ID_TEXT:
                out.append("" if skip_special_tokens else _ID_TEXT[i])
            else:
                out.append("\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """Render a conversation with the byte chat template (see the module docstring)."""
        parts = ["<s>"]
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise TokenizerError(
                    f"chat message {i} must be a mapping with 'role' and 'content', got {msg!r}"
                )
            parts.append(f"<|{msg['role']}|>\n{msg['content']}</s>\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        text = "".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(model_name_or_dir: str) -> Any:
    """The tokenizer for a model: the byte tokenizer for random-init builtins, else HF's AutoTokenizer.

    ``minilm`` resolves to its pip-installed directory; a local directory is loaded with
    ``local_files_only=True``; a hub id loads from the local Hugging Face cache when its tokenizer files
    are there (no network), else downloads when the hub is reachable (``lorakit.models.hub``).
    """
    if model_name_or_dir in BUILTIN_SPECS:
        return ByteTokenizer()
    try:
        source = model_source(model_name_or_dir, hub.TOKENIZER)
    except ModelError as e:
        raise TokenizerError(str(e)) from None
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - only without the hf extra
        raise TokenizerError("Hugging Face tokenizers need transformers: pip install 'lorakit[hf]'") from e
    try:
        return AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_only)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"cannot load a tokenizer from {model_name_or_dir!r}: {first}") from e


def pad_id(tokenizer: Any) -> int:
    """The id used to pad: the tokenizer's pad token, else its eos token, else 0 (pads are masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``encode(..., add_special_tokens=True)`` starts with the tokenizer's BOS (Llama yes, GPT-2 no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``apply_chat_template`` can render conversations for this tokenizer."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")
