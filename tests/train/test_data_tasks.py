"""Task encoding: prompt masking exactly on prompt tokens, chat masking, label mapping, truncation."""

import json

import pytest

from lorakit.models.tokenizer import ByteTokenizer, load_tokenizer
from lorakit.train.data import DataError, RawData, read_records
from lorakit.train.tasks import IGNORE_INDEX, encode_records, load_datasets

ALPACA = "/work/shared/datasets/alpaca_1k/alpaca_data_1k.json"
SST2_DEV = "/work/shared/datasets/sst2/dev.tsv"
TOK = ByteTokenizer()


def _raw(rows):
    return RawData("mem.jsonl", rows, list(range(1, len(rows) + 1)))


def test_alpaca_labels_masked_exactly_on_prompt():
    raw = read_records(ALPACA)
    ds = encode_records(raw, TOK, "sft", max_length=4096)
    assert ds.format == "alpaca" and len(ds) == 1000 and ds.n_truncated == 0
    for i in (0, 1):  # row 0 has no input, row 1 has one
        rec = raw.records[i]
        if rec["input"]:
            prompt = (
                "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                f"{rec['instruction']}\n\n### Input:\n{rec['input']}\n\n### Response:\n"
            )
        else:
            prompt = (
                "Below is an instruction that describes a task. Write a response that appropriately "
                f"completes the request.\n\n### Instruction:\n{rec['instruction']}\n\n### Response:\n"
            )
        p = [257, *prompt.encode()]
        c = [*rec["output"].encode(), 258]
        ex = ds.examples[i]
        assert ex["input_ids"] == p + c
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + c


def test_prompt_completion_and_text():
    ds = encode_records(_raw([{"prompt": "Q:", "completion": "A"}]), TOK, "sft")
    assert ds.format == "prompt_completion"
    assert ds.examples[0] == {"input_ids": [257, 81, 58, 65, 258], "labels": [-100, -100, -100, 65, 258]}
    ds = encode_records(_raw([{"text": "ab"}]), TOK, "sft")
    assert ds.examples[0]["labels"] == ds.examples[0]["input_ids"] == [257, 97, 98, 258]


def test_chat_masks_all_but_assistant_turns():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "V"},
        {"role": "assistant", "content": "A2"},
    ]
    ex = encode_records(_raw([{"messages": msgs}]), TOK, "sft").examples[0]
    text = TOK.apply_chat_template(msgs)
    assert ex["input_ids"] == TOK.encode(text, add_special_tokens=False)
    targets = TOK.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert targets == "A1</s>\nA2</s>\n"


def test_chat_with_hf_tokenizer_template():
    tok = load_tokenizer("minilm")
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good morning"}]
    ex = encode_records(_raw([{"messages": msgs}]), tok, "sft").examples[0]
    kept = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == "good morning [SEP]"
    with pytest.raises(DataError, match="chat template"):
        encode_records(_raw([{"messages": msgs}]), load_tokenizer("minilm"), "sft")


def test_truncation_counted_and_untrainable_rows_dropped():
    rows = [
        {"prompt": "x" * 20, "completion": "y"},
        {"prompt": "p", "completion": "z" * 20},
        {"prompt": "", "completion": "ok"},
    ]
    ds = encode_records(_raw(rows), TOK, "sft", max_length=10)
    assert ds.n_truncated == 2 and ds.n_dropped == 1 and len(ds) == 2
    assert ds.full_lengths == [23, 23, 4] and ds.lengths == [10, 4]
    assert ds.source_rows == [1, 2]


def test_classification_label_mapping_sorted_and_unseen_label():
    rows = [
        {"text": "a", "label": "World"},
        {"text": "b", "label": "Sports"},
        {"text": "c", "label": "Business"},
    ]
    ds = encode_records(_raw(rows), TOK, "classification")
    assert ds.label_names == ["Business", "Sports", "World"]
    assert [e["labels"] for e in ds.examples] == [2, 1, 0]
    nums = encode_records(
        _raw([{"text": "a", "label": 10}, {"text": "b", "label": 9}]), TOK, "classification"
    )
    assert nums.label_names == ["9", "10"]  # numeric order, not string order
    with pytest.raises(DataError, match=r"mem\.jsonl:1: label 'Sci/Tech' was not seen in training"):
        encode_records(
            _raw([{"text": "d", "label": "Sci/Tech"}]), TOK, "classification", label_names=ds.label_names
        )


def test_classification_pairs_and_hf_truncation():
    tok = load_tokenizer("minilm")
    ds = encode_records(_raw([{"text": "hello", "text_pair": "world", "label": 1}]), tok, "classification")
    assert ds.examples[0]["input_ids"] == [101, 7592, 102, 2088, 102]
    assert ds.examples[0]["token_type_ids"] == [0, 0, 0, 1, 1]
    ds = encode_records(_raw([{"text": "hello " * 20, "label": 0}]), tok, "classification", max_length=8)
    assert (
        ds.n_truncated == 1
        and len(ds.examples[0]["input_ids"]) == 8
        and ds.examples[0]["input_ids"][-1] == 102
    )


def test_missing_fields_and_bad_task(tmp_path):
    with pytest.raises(DataError, match=r"mem\.jsonl:1: no SFT fields found.*fields present: \['body'\]"):
        encode_records(_raw([{"body": "x"}]), TOK, "sft")
    with pytest.raises(DataError, match=r"mem\.jsonl:2: field 'completion' is missing"):
        encode_records(_raw([{"prompt": "a", "completion": "b"}, {"prompt": "c"}]), TOK, "sft")
    with pytest.raises(DataError, match=r"field 'label' is missing"):
        encode_records(_raw([{"text": "a"}]), TOK, "classification")
    with pytest.raises(DataError, match="task='regression'"):
        encode_records(_raw([{"text": "a"}]), TOK, "regression")


def test_load_datasets_validation_file_uses_training_labels(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps({"s": t, "y": y}) for t, y in [("a", "neg"), ("b", "pos")])
    )
    (tmp_path / "val.jsonl").write_text(json.dumps({"s": "c", "y": "neutral"}) + "\n")
    with pytest.raises(DataError, match=r"val\.jsonl:1: label 'neutral' was not seen in training"):
        load_datasets(
            str(tmp_path / "train.jsonl"),
            TOK,
            "classification",
            fields="text=s,label=y",
            val_path=str(tmp_path / "val.jsonl"),
        )
    train, val = load_datasets(
        SST2_DEV, TOK, "classification", fields={"text": "sentence"}, val_fraction=0.25
    )
    assert len(train) + len(val) == 872 and val.label_names == train.label_names == ["0", "1"]
