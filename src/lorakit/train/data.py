"""Reading training data: JSONL, JSON arrays and CSV/TSV files, with a field mapping.

A *field mapping* renames the file's columns to the names lorakit's tasks read
(``lorakit.train.tasks``): ``{"text": "sentence", "label": "label"}`` means "the ``text`` field is the
file's ``sentence`` column". A source may be a dotted path into nested JSON (``instances.0.input``)
and, for a CSV/TSV without a header row, a column number (``{"text": "0", "label": "1"}``).

Every error is a ``DataError`` (a ``ValueError``) on one line naming the file, the line number where
there is one, the field, and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON_EXTS = (".jsonl", ".ndjson", ".json")
TABLE_EXTS = {".csv": ",", ".tsv": "\t"}
SUPPORTED_EXTS = JSON_EXTS + tuple(TABLE_EXTS)

# Canonical field names the tasks read (see lorakit.train.tasks).
CANONICAL_FIELDS = (
    "text",
    "text_pair",
    "label",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "messages",
)


class DataError(ValueError):
    """Training data cannot be read or does not have the fields a task needs."""


@dataclass
class RawData:
    """Rows read from one file, after the field mapping; ``lines[i]`` is where row ``i`` starts (1-based)."""

    path: str
    records: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)
    array: bool = False  # rows are items of a JSON array (several may share a line)
    items: list[int] = field(default_factory=list)  # 1-based position of each row in its file

    def where(self, i: int) -> str:
        """``file:line`` of row ``i`` for error messages (plus the item number for JSON arrays)."""
        if i >= len(self.lines):
            return f"{self.path} row {i + 1}"
        item = self.items[i] if i < len(self.items) else i + 1
        return f"{self.path}:{self.lines[i]}" + (f" (item {item})" if self.array else "")

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> RawData:
        items = [self.items[i] if i < len(self.items) else i + 1 for i in indices]
        return RawData(
            self.path, [self.records[i] for i in indices], [self.lines[i] for i in indices], self.array, items
        )


def parse_fields(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """A field mapping from ``"text=sentence,label=label"`` (CLI form) or a mapping; checks the names."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        pairs = []
        for item in str(spec).split(","):
            if "=" not in item:
                raise DataError(
                    f"field mapping item {item.strip()!r} must look like name=column (e.g. text=sentence)"
                )
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    for k, v in pairs:
        if k not in CANONICAL_FIELDS:
            raise DataError(f"field mapping: unknown field {k!r}; expected one of {list(CANONICAL_FIELDS)}")
        if not v:
            raise DataError(f"field mapping: field {k!r} maps to an empty column name")
    return dict(pairs)


def _lookup(row: Any, source: str) -> Any:
    """``row[source]``, following a dotted path through dicts and lists; KeyError when absent."""
    if isinstance(row, Mapping) and source in row:
        return row[source]
    cur = row
    for part in source.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(source)
    return cur


def _apply_mapping(row: dict[str, Any], fields: Mapping[str, str], where: str) -> dict[str, Any]:
    if not fields:
        return row
    out = dict(row)
    for name, source in fields.items():
        try:
            out[name] = _lookup(row, source)
        except KeyError:
            raise DataError(
                f"{where}: field {source!r} (mapped to {name!r}) is missing; fields present: {sorted(row)}"
            ) from None
    return out


def _read_jsonl(path: str) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: bad JSON line ({e.msg} at column {e.colno})") from None
            lines.append(lineno)
    return rows, lines


def _read_json(path: str) -> tuple[list[Any], list[int], bool]:
    """Rows of a JSON array (or of an object holding one array), their start lines, and True; a .json
    file holding JSON Lines falls back to the line reader (and False)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            return (*_read_jsonl(path), False)
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    pos = 0
    if isinstance(data, Mapping):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON array of objects (or an object holding one array), got keys {sorted(data)}"
            )
        pos = text.index(json.dumps(lists[0])[1:-1])
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    # Line numbers of the array items: the line on which each item starts.
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = text.index("[", pos) + 1
    line = text.count("\n", 0, pos) + 1
    for _ in data:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return data, lines, True


def _read_table(path: str, delimiter: str, header: bool) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    lines: list[int] = []
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        names: list[str] | None = None
        start = 1
        for cells in reader:
            lineno, start = start, reader.line_num + 1
            if not cells or all(not c.strip() for c in cells):
                continue
            if header and names is None:
                names = [c.strip() for c in cells]
                continue
            if names is None:
                names = [str(i) for i in range(len(cells))]
            if len(cells) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} columns {names}, got {len(cells)}")
            rows.append(dict(zip(names, cells)))
            lines.append(lineno)
    return rows, lines


def read_records(
    path: str | os.PathLike[str],
    fields: Mapping[str, str] | str | None = None,
    header: bool | None = None,
) -> RawData:
    """Read a data file into rows (dicts), applying the field mapping.

    Args:
        path: a ``.jsonl``/``.ndjson`` (one object per line), ``.json`` (an array of objects), ``.csv`` or
            ``.tsv`` file. TSV is read without quote handling (as GLUE files need), CSV with standard quoting.
        fields: canonical name -> source field (see the module docstring), or the CLI string form.
        header: whether a CSV/TSV has a header row; default: yes, unless every mapped source is a number.
    Raises:
        DataError: missing file, unknown extension, bad JSON (with file and line), a row that is not an
            object, a missing mapped field (naming it and the fields present), or an empty file.
    """
    path = os.fspath(path)
    mapping = parse_fields(fields)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    array = False
    if ext in (".jsonl", ".ndjson"):
        rows, lines = _read_jsonl(path)
    elif ext == ".json":
        rows, lines, array = _read_json(path)
    elif ext in TABLE_EXTS:
        if header is None:
            header = not (mapping and all(v.isdigit() for v in mapping.values()))
        rows, lines = _read_table(path, TABLE_EXTS[ext], header)
    else:
        raise DataError(
            f"{path}: unknown data file extension {ext!r}; expected one of {list(SUPPORTED_EXTS)}"
        )
    out = RawData(path, [], lines, array=array)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{out.where(i)}: expected a JSON object per row, got {type(row).__name__}")
        out.records.append(_apply_mapping(row, mapping, out.where(i)))
    if not out.records:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    return out


def split_validation(raw: RawData, fraction: float, seed: int = 0) -> tuple[RawData, RawData]:
    """Split rows into (train, validation) with a seeded shuffle; ``fraction`` of rows (at least 1) go to validation."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction={fraction!r} must be in (0, 1)")
    if len(raw) < 2:
        raise DataError(f"{raw.path}: {len(raw)} row(s) cannot be split into train and validation")
    order = list(range(len(raw)))
    random.Random(seed).shuffle(order)
    n_val = min(len(raw) - 1, max(1, round(fraction * len(raw))))
    return raw.subset(sorted(order[n_val:])), raw.subset(sorted(order[:n_val]))
