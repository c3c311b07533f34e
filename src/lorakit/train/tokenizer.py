"""Moved to ``lorakit.models.tokenizer`` (serving and generation use it too: it belongs with the models);
this old import path re-exports its public names for one release."""

from lorakit.models.tokenizer import (
    BYTE_VOCAB_SIZE,
    UNK_ID,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    adds_bos,
    has_chat_template,
    load_tokenizer,
    pad_id,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "UNK_ID",
    "ByteTokenizer",
    "Tokenizer",
    "TokenizerError",
    "adds_bos",
    "has_chat_template",
    "load_tokenizer",
    "pad_id",
]
