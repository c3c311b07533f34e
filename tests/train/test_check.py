"""Data check numbers on a hand-made file (counted by hand below) and the data-check CLI."""

import json

import pytest

from lorakit.cli.main import main
from lorakit.models.tokenizer import ByteTokenizer
from lorakit.train.check import check_dataset, percentile
from lorakit.train.data import DataError, read_records
from lorakit.train.tasks import encode_records

ALPACA = "/work/shared/datasets/alpaca_1k/alpaca_data_1k.json"

# 6 rows: one empty text, one exact duplicate (row 4 = row 1); labels: pos x3, neg x2, neu x1.
ROWS = [
    {"sentence": "good", "y": "pos"},  # <s> good </s> -> 6 tokens
    {"sentence": "", "y": "neg"},  # 2 tokens, empty
    {"sentence": "bad movie", "y": "neg"},  # 11
    {"sentence": "good", "y": "pos"},  # 6, duplicate of row 1
    {"sentence": "x" * 30, "y": "pos"},  # 32, truncated at 16
    {"sentence": "meh", "y": "neu"},  # 5
]


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_percentile_nearest_rank():
    v = list(range(1, 101))
    assert (percentile(v, 50), percentile(v, 90), percentile(v, 99), percentile(v, 100)) == (50, 90, 99, 100)
    assert percentile([2, 5, 6, 6, 11, 32], 50) == 6 and percentile([7], 99) == 7 and percentile([], 50) == 0


def test_classification_report_numbers(data_file):
    r = check_dataset(
        str(data_file), "tiny-bert", "classification", max_length=16, fields="text=sentence,label=y"
    )
    assert (r.rows, r.empty_rows, r.duplicate_rows, r.truncated) == (6, 1, 1, 1)
    assert r.label_counts == {"neg": 2, "neu": 1, "pos": 3}
    # lengths sorted: 2 5 6 6 11 32 -> p50 = 3rd = 6, p90 = ceil(5.4) = 6th = 32
    assert (r.tokens_p50, r.tokens_p90, r.tokens_p99, r.tokens_max) == (6, 32, 32, 32)
    assert r.tokens_total == 62 and r.tokens_mean == pytest.approx(62 / 6, abs=0.01)
    d = r.as_dict()
    assert d["label_counts"]["pos"] == 3 and json.dumps(d)
    table = r.table()
    assert "duplicate rows" in table and "pos" in table and "truncated at 16" in table


def test_sft_report_on_alpaca():
    r = check_dataset(ALPACA, "tiny-llama", "sft", max_length=1024)
    assert (r.rows, r.format, r.empty_rows, r.duplicate_rows, r.label_counts) == (1000, "alpaca", 0, 0, None)
    assert r.tokens_p50 <= r.tokens_p90 <= r.tokens_p99 <= r.tokens_max
    full = encode_records(read_records(ALPACA), ByteTokenizer(), "sft", max_length=8192).full_lengths
    assert r.truncated == sum(n > 1024 for n in full) == 50 and r.tokens_max == max(full) == 2385


def test_cli_data_check(data_file, capsys):
    rc = main(
        [
            "data-check",
            "--data",
            str(data_file),
            "--task",
            "classification",
            "--fields",
            "text=sentence,label=y",
            "--max-length",
            "16",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 6 and out["truncated"] == 1
    assert main(["data-check", "--data", str(data_file) + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(DataError):
        check_dataset(str(data_file), "tiny-llama", "sft")  # no SFT fields: sentence/y only
