"""The GPU table the planner prices and sizes with: memory, peak bf16 TFLOP/s, hourly price.

The defaults live in ``lorakit/data/gpus.json``; every value there is an assumption (datasheet peaks,
indicative cloud prices) that users can edit or replace with their own file of the same layout.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lorakit.planner.arch import PlanError


@dataclass(frozen=True)
class Gpu:
    """One accelerator type. ``memory_gb`` and ``overhead_gb`` are GiB; ``peak_tflops`` is dense bf16."""

    name: str
    memory_gb: float
    peak_tflops: float
    price_per_hour: float
    overhead_gb: float = 1.0
    note: str = ""

    def __post_init__(self) -> None:
        for field_name in ("memory_gb", "peak_tflops"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise PlanError(f"GPU {self.name!r}: {field_name}={value!r} must be a positive number")
        for field_name in ("price_per_hour", "overhead_gb"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PlanError(f"GPU {self.name!r}: {field_name}={value!r} must be a number >= 0")


def default_table_path() -> str:
    return str(resources.files("lorakit") / "data" / "gpus.json")


def load_gpus(path: str | None = None) -> dict[str, Gpu]:
    """The GPU table from ``path`` (default: the packaged ``gpus.json``), name -> :class:`Gpu`."""
    path = path or default_table_path()
    if not os.path.isfile(path):
        raise PlanError(f"GPU table {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except json.JSONDecodeError as e:
        raise PlanError(f"GPU table {path!r} is not valid JSON: {e}") from None
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise PlanError(f"GPU table {path!r}: expected an object with a non-empty 'gpus' mapping")
    table: dict[str, Gpu] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise PlanError(f"GPU table {path!r}: entry {name!r} must be an object")
        unknown = set(entry) - {"memory_gb", "peak_tflops", "price_per_hour", "overhead_gb", "note"}
        if unknown:
            raise PlanError(f"GPU table {path!r}: entry {name!r} has unknown fields {sorted(unknown)}")
        try:
            table[name] = Gpu(name=name, **entry)
        except TypeError as e:
            raise PlanError(f"GPU table {path!r}: entry {name!r}: {e}") from None
    return table


def get_gpu(name: str | Gpu, table: dict[str, Gpu] | None = None) -> Gpu:
    """Look a GPU up by name, case-insensitively: the full table name (``H100-80GB``), or any unambiguous
    part of its model (``h100``, ``a6000``, ``4090``). An ambiguous one (``a100``: 40 GB or 80 GB) and an
    unknown one raise ``PlanError`` listing the candidates / the known GPUs."""
    if isinstance(name, Gpu):
        return name
    table = table if table is not None else load_gpus()
    if not isinstance(name, str) or not name.strip():
        raise PlanError(f"gpu={name!r} must be a GPU name; known GPUs: {', '.join(table)}")
    q = name.strip().lower()
    by_lower = {k.lower(): v for k, v in table.items()}
    if q in by_lower:
        return by_lower[q]
    model = {k: k.lower().split("-", 1)[0] for k in table}  # "RTX4090-24GB" -> "rtx4090"
    exact = [k for k, m in model.items() if m == q]
    partial = exact or [k for k, m in model.items() if q in m or k.lower().startswith(q)]
    if len(partial) == 1:
        return table[partial[0]]
    if partial:
        raise PlanError(f"gpu={name!r} is ambiguous: {' or '.join(partial)}; give the full name")
    close = difflib.get_close_matches(q, list(by_lower), n=1, cutoff=0.4)
    hint = f" (did you mean {by_lower[close[0]].name!r}?)" if close else ""
    raise PlanError(f"gpu={name!r} is not in the GPU table{hint}; known GPUs: {', '.join(table)}")
