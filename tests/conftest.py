"""Shared fixtures: builtin tiny models (built offline) and helpers."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
DATASETS = os.path.join(SHARED, "datasets")


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: tiny models (and small SVDs / QRs) gain nothing from threads and lose
    a lot to other processes' spinning ones on a busy machine. Files opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def datasets_dir() -> str:
    if not os.path.isdir(DATASETS):
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS
