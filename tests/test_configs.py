"""Every shipped config under configs/ (found recursively) starts with the command that runs it, loads
and validates, and points at data that exists when the shared datasets are checked out beside the repo."""

from __future__ import annotations

import glob
import os

import pytest

from lorakit.train.config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def test_configs_are_shipped():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_and_starts_with_its_command(path):
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    rel = os.path.relpath(path, ROOT)
    assert first.startswith("# ") and "lorakit" in first and rel in first, f"{rel}: first line {first!r}"
    cfg = load_run_config(path)
    for data in (cfg.data.train, cfg.data.validation):
        if data and os.path.isdir(SHARED) and SHARED in data:
            assert os.path.isfile(data), f"{rel}: {data} does not exist"
