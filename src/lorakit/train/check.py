"""Data check before training: counts, empty and duplicate rows, label balance, token lengths, truncation.

Looking at the data before spending compute on it is the first "data quality" practice of every fine-tuning
guide; this is what ``lorakit data-check`` prints and what the trainer prints before its first step.

Percentiles use the nearest-rank definition: p-th percentile = the ceil(p/100 * n)-th smallest length.
Lengths are token counts *before* truncation (what the rows would need), and ``truncated`` counts the rows
longer than ``max_length``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lorakit.models.tokenizer import load_tokenizer
from lorakit.train.data import RawData, read_records
from lorakit.train.tasks import EncodedDataset, encode_records

_REQUIRED = {
    "classification": ("text",),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of already sorted values (0 for an empty list)."""
    if not sorted_values:
        return 0
    k = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return int(sorted_values[k - 1])


@dataclass
class DataReport:
    """What ``check_dataset`` found. ``as_dict()`` for JSON, ``table()`` (or ``str()``) for people."""

    path: str
    task: str
    format: str
    rows: int
    empty_rows: int
    duplicate_rows: int
    max_length: int
    truncated: int
    dropped: int
    tokens_p50: int
    tokens_p90: int
    tokens_p99: int
    tokens_max: int
    tokens_mean: float
    tokens_total: int
    label_counts: dict[str, int] | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        def pct(n: int) -> str:
            return f"{n:>8,}  ({100.0 * n / self.rows:5.1f}%)" if self.rows else f"{n:>8,}"

        lines = [
            f"data check: {self.path}  (task {self.task}, format {self.format})",
            f"  rows                {self.rows:>8,}",
            f"  empty rows          {pct(self.empty_rows)}",
            f"  duplicate rows      {pct(self.duplicate_rows)}",
            f"  tokens p50/p90/p99  {self.tokens_p50:,} / {self.tokens_p90:,} / {self.tokens_p99:,}",
            f"  tokens max / mean   {self.tokens_max:,} / {self.tokens_mean:,.1f}  (total {self.tokens_total:,})",
            f"  truncated at {self.max_length:<6}{pct(self.truncated)}",
        ]
        if self.task == "sft":
            lines.append(f"  dropped (no target) {pct(self.dropped)}")
        if self.label_counts is not None:
            lines.append(f"  labels ({len(self.label_counts)})")
            for name, n in self.label_counts.items():
                lines.append(f"    {name[:16]:<16}  {pct(n)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = table


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value in ([], {})


def _row_empty(record: Mapping[str, Any], fmt: str) -> bool:
    if fmt == "messages":
        msgs = record.get("messages")
        return _is_empty(msgs) or any(_is_empty(m.get("content")) for m in msgs if isinstance(m, Mapping))
    return any(_is_empty(record.get(f)) for f in _REQUIRED.get(fmt, ()))


def _row_key(record: Mapping[str, Any], fmt: str) -> str:
    names = (
        ("text", "text_pair", "label")
        if fmt == "classification"
        else {
            "text": ("text",),
            "prompt_completion": ("prompt", "completion"),
            "alpaca": ("instruction", "input", "output"),
            "messages": ("messages",),
        }[fmt]
    )
    return json.dumps([record.get(n) for n in names], sort_keys=True, default=str)


def report_from(raw: RawData, encoded: EncodedDataset) -> DataReport:
    """The data report of rows ``raw`` and their encoding (so a trainer can report without re-encoding)."""
    fmt = encoded.format
    empty = sum(_row_empty(r, fmt) for r in raw.records)
    seen: set[str] = set()
    dup = 0
    for r in raw.records:
        key = _row_key(r, fmt)
        dup += key in seen
        seen.add(key)
    lengths = sorted(encoded.full_lengths)
    labels = None
    warnings: list[str] = []
    if encoded.task == "classification":
        counts = Counter(str(r["label"]).strip() for r in raw.records)
        labels = {name: counts.get(name, 0) for name in encoded.label_names or []}
        if labels and min(labels.values()) * 10 < max(labels.values()):
            warnings.append("labels are imbalanced more than 10:1; consider macro-F1 and class weights")
    n = len(raw)
    if empty:
        warnings.append(f"{empty} empty row(s)")
    if dup * 20 > n:
        warnings.append(f"{dup} duplicate row(s) ({100.0 * dup / n:.1f}%)")
    if encoded.n_truncated * 10 > n:
        warnings.append(
            f"{encoded.n_truncated} row(s) ({100.0 * encoded.n_truncated / n:.1f}%) exceed max_length="
            f"{encoded.max_length}; p99 is {percentile(lengths, 99)} tokens"
        )
    return DataReport(
        path=raw.path,
        task=encoded.task,
        format=fmt,
        rows=n,
        empty_rows=empty,
        duplicate_rows=dup,
        max_length=encoded.max_length,
        truncated=encoded.n_truncated,
        dropped=encoded.n_dropped,
        tokens_p50=percentile(lengths, 50),
        tokens_p90=percentile(lengths, 90),
        tokens_p99=percentile(lengths, 99),
        tokens_max=lengths[-1] if lengths else 0,
        tokens_mean=round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        tokens_total=sum(lengths),
        label_counts=labels,
        warnings=warnings,
    )


def check_dataset(
    path: str,
    tokenizer: Any = "tiny-llama",
    task: str = "sft",
    max_length: int = 512,
    fields: Mapping[str, str] | str | None = None,
    format: str = "auto",
) -> DataReport:
    """Read, tokenize and report on one data file.

    Args:
        path: a JSONL / JSON / CSV / TSV file (``lorakit.train.data.read_records``).
        tokenizer: a tokenizer, or a model name / directory to load one from (``load_tokenizer``).
        task: "sft" or "classification".
        max_length: the training max length, to count truncated rows.
        fields: field mapping, e.g. ``{"text": "sentence"}`` or ``"text=sentence,label=label"``.
        format: SFT row format or "auto".
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    raw = read_records(path, fields)
    return report_from(raw, encode_records(raw, tok, task, max_length, format))
