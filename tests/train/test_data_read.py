"""Readers (JSONL, JSON array, CSV, TSV), field mapping, and every reading error with file and line."""

import json

import pytest

from lorakit.train.data import DataError, parse_fields, read_records, split_validation

SST2 = "/work/shared/datasets/sst2/dev.tsv"
ALPACA = "/work/shared/datasets/alpaca_1k/alpaca_data_1k.json"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_mapping_and_nested_path(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"q": "a", "x": {"ans": ["b"]}}\n\n{"q": "c", "x": {"ans": ["d"]}}\n')
    raw = read_records(p, "prompt=q,completion=x.ans.0")
    assert [(r["prompt"], r["completion"]) for r in raw.records] == [("a", "b"), ("c", "d")]
    assert raw.lines == [1, 3]


def test_json_array_lines_and_wrapped_array(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    p = _write(tmp_path / "d.json", json.dumps(rows, indent=1))
    raw = read_records(p)
    assert [r["text"] for r in raw.records] == ["a", "b", "c"]
    assert raw.lines == [2, 5, 8]  # each object starts on its own line with indent=1
    q = _write(tmp_path / "w.json", json.dumps({"data": rows}))
    assert len(read_records(q)) == 3


def test_csv_quoting_and_tsv_without_header(tmp_path):
    p = _write(tmp_path / "d.csv", 'sentence,label\n"hello, world",pos\nbye,neg\n')
    raw = read_records(p, {"text": "sentence"})
    assert [(r["text"], r["label"]) for r in raw.records] == [("hello, world", "pos"), ("bye", "neg")]
    q = _write(tmp_path / "d.tsv", 'a "quote\tWorld\nb\tSports\n')
    raw = read_records(q, "text=0,label=1")
    assert [(r["text"], r["label"]) for r in raw.records] == [('a "quote', "World"), ("b", "Sports")]


def test_real_files():
    sst2 = read_records(SST2, {"text": "sentence"})
    assert len(sst2) == 872 and sst2.records[0]["label"] in ("0", "1") and sst2.lines[0] == 2
    alpaca = read_records(ALPACA)
    assert len(alpaca) == 1000 and set(alpaca.records[0]) == {"instruction", "input", "output"}
    assert alpaca.where(41) == f"{ALPACA}:1 (item 42)"


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="extension '.parquet'"):
        read_records(_write(tmp_path / "d.parquet", "x"))


def test_bad_json_line_names_file_and_line(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: bad JSON line"):
        read_records(p)
    q = _write(tmp_path / "d.json", '[\n{"text": "a"},\n{"text" "b"}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: bad JSON"):
        read_records(q)


def test_missing_field_names_field_and_fields_present(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"sentence": "a", "label": 1}\n{"sent": "b", "label": 0}\n')
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:2: field 'sentence' \(mapped to 'text'\) is missing; "
        r"fields present: \['label', 'sent'\]",
    ):
        read_records(p, {"text": "sentence"})


def test_row_shape_errors(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        read_records(_write(tmp_path / "d.jsonl", "[1, 2]\n"))
    with pytest.raises(DataError, match=r"d\.tsv:3: expected 2 columns"):
        read_records(_write(tmp_path / "d.tsv", "text\tlabel\na\t1\nb\n"))


def test_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "d.jsonl", "\n\n"))
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "d.csv", "text,label\n"))
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "d.json", "[]"))


def test_field_spec_errors():
    assert parse_fields("text=sentence, label=y") == {"text": "sentence", "label": "y"}
    with pytest.raises(DataError, match="unknown field 'txt'"):
        parse_fields("txt=sentence")
    with pytest.raises(DataError, match="name=column"):
        parse_fields("sentence")


def test_split_validation_is_seeded_and_disjoint():
    raw = read_records(SST2, {"text": "sentence"})
    tr, va = split_validation(raw, 0.1, seed=3)
    tr2, va2 = split_validation(raw, 0.1, seed=3)
    assert va.lines == va2.lines and len(va) == 87 and len(tr) == 785
    assert not set(tr.lines) & set(va.lines)
