"""training.return_freed_memory: freed tensors leave the resident set (glibc, Linux), in a fresh process
(the allocator policy is process-wide), against the same allocation pattern under glibc's default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.train.config import load_run_config

PATTERN = r"""
import json, sys, torch
from lorakit.train.host_memory import return_freed_memory
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
why = return_freed_memory() if sys.argv[1] == "on" else None
first = torch.ones(5 << 20); del first  # one 20 MiB tensor freed: glibc's threshold moves above 20 MiB
before = rss_mb()
kept = [torch.ones(5 << 20) for _ in range(15)]  # 300 MiB of 20 MiB tensors, pages touched
held = rss_mb()
last = kept[-1]
del kept  # everything freed but the last tensor, which pins the top of glibc's heap
print(json.dumps({"why": why, "grew": held - before, "left": rss_mb() - before}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator policy (Linux)")
def test_freed_tensors_leave_the_resident_set():
    default, on = _run("off"), _run("on")
    assert on["why"] is None
    assert default["grew"] > 250 and on["grew"] > 250  # both really held ~300 MiB
    assert default["left"] > 250, default  # glibc's default: the heap keeps the freed 280 MiB resident
    assert on["left"] < 40, on  # mapped tensors: unmapped when freed (the last one stays)


def test_the_field_defaults_on_and_parses(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: tiny-llama}\ndata: {train: x.jsonl}\noutput: {dir: out}\n")
    assert load_run_config(str(cfg), []).training.return_freed_memory is True
    assert load_run_config(str(cfg), ["training.return_freed_memory=false"]).training.return_freed_memory is False
