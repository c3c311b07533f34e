"""The builtin models' byte vocabulary as a ``transformers`` tokenizer, for trainers that need a real one.

lorakit's own ``ByteTokenizer`` (``lorakit.models.tokenizer``) implements only the part of the tokenizer
interface lorakit uses; ``trl.SFTTrainer`` and HF data collators want a ``PreTrainedTokenizerFast``. This
builds one with the same ids, from the ``tokenizers`` library's own parts: a BPE model with no merges whose
vocabulary holds only the 256 byte tokens ``<0xNN>`` (ids 0-255), so byte fallback turns every character
into its UTF-8 bytes; ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258, ``<unk>`` 259; special tokens added as
``<s> text </s>`` (a pair: ``<s> a </s> b </s>``). tests/integrations check it against ``ByteTokenizer``.
"""

from __future__ import annotations

from typing import Any

from lorakit.models.builtin import BOS_ID, EOS_ID, PAD_ID
from lorakit.models.tokenizer import BYTE_VOCAB_SIZE, UNK_ID


def byte_tokenizer() -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` equal to lorakit's ``ByteTokenizer`` (ids and specials)."""
    try:
        from tokenizers import Tokenizer, decoders, models, processors
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - only without the hf extra
        raise ImportError('byte_tokenizer needs transformers and tokenizers: pip install "lorakit[hf]"') from e
    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | specials
    assert len(vocab) == BYTE_VOCAB_SIZE
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
