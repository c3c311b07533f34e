"""Byte tokenizer: ids, specials, round trip, chat template; load_tokenizer dispatch."""

import pytest

from lorakit.models.tokenizer import (
    ByteTokenizer,
    TokenizerError,
    adds_bos,
    has_chat_template,
    load_tokenizer,
    pad_id,
)


def test_byte_ids_are_utf8_bytes_with_specials():
    tok = ByteTokenizer()
    assert tok.encode("hé", add_special_tokens=False) == [104, 0xC3, 0xA9]
    assert tok.encode("hé") == [257, 104, 0xC3, 0xA9, 258]
    assert tok.encode("a", "b") == [257, 97, 258, 98, 258]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (256, 257, 258, 260)


def test_round_trip_and_special_text():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 ✓"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text)) == f"<s>{text}</s>"
    assert tok.encode("x</s>", add_special_tokens=False) == [120, 258]
    assert tok.decode([104, 0xC3, 300]) == "h\ufffd\ufffd"  # broken UTF-8 and an out-of-vocab id


def test_call_truncation_keeps_eos():
    out = ByteTokenizer()("abcdef", truncation=True, max_length=4)
    assert out["input_ids"] == [257, 97, 98, 258]
    assert out["attention_mask"] == [1, 1, 1, 1]


def test_chat_template_prefix_property():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    full = tok.apply_chat_template(msgs)
    assert full == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    assert tok.apply_chat_template(msgs, tokenize=True)[0] == 257
    with pytest.raises(TokenizerError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_load_tokenizer_dispatch():
    for name in ("tiny-llama", "tiny-gpt2", "tiny-bert", "llama-15m"):
        assert isinstance(load_tokenizer(name), ByteTokenizer)
    minilm = load_tokenizer("minilm")
    assert minilm.encode("hello world") == [101, 7592, 2088, 102]
    assert pad_id(minilm) == 0 and not adds_bos(minilm) and not has_chat_template(minilm)
    assert adds_bos(ByteTokenizer()) and has_chat_template(ByteTokenizer())
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("/no/such/model_dir")


def test_the_old_import_paths_in_train_still_give_the_same_objects():
    import lorakit.models.generate as gen
    import lorakit.models.tokenizer as tok
    from lorakit.train import generate as old_gen
    from lorakit.train import tokenizer as old_tok

    assert all(getattr(old_tok, n) is getattr(tok, n) for n in old_tok.__all__)
    assert all(getattr(old_gen, n) is getattr(gen, n) for n in old_gen.__all__)
