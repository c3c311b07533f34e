"""The one-GPU FSDP smoke case of ``--suite gpu`` (benchmarks/fsdp_smoke.py): its launch runs here on CPU
(one torchrun process, ``LORAKIT_FSDP_ONE_PROCESS=1``), it skips with a one-line reason without CUDA, and
the harness reports it only for a CUDA suite."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from benchmarks import fsdp_smoke, run
from lorakit.config import ConfigError
from lorakit.train import fsdp
from lorakit.train.distributed import Dist


def test_smoke_command_is_one_torchrun_process_with_the_flag(tmp_path):
    cfg = fsdp_smoke.smoke_config(str(tmp_path), "llama-15m")
    argv, env = fsdp_smoke.smoke_command(cfg)
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "lorakit",
                        "train", cfg]
    assert env["LORAKIT_FSDP_ONE_PROCESS"] == "1"
    from lorakit.train.config import load_run_config

    c = load_run_config(cfg)  # a valid config: bf16 on CUDA, NF4, FSDP
    assert (c.training.distributed, c.training.device, c.training.mixed_precision) == ("fsdp", "cuda", "bf16")
    assert c.quant.dtype == "nf4"


@pytest.mark.slow
def test_the_smoke_launch_runs_on_cpu(tmp_path):
    """The same launch with device cpu (fp32): one process, FSDP-wrapped, its checks pass."""
    argv, extra = fsdp_smoke.smoke_command(fsdp_smoke.smoke_config(str(tmp_path), "tiny-llama", 2, "cpu"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env={**os.environ, **extra})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = fsdp_smoke.check_run(str(tmp_path / "run"), expect_device="cpu")
    assert got["steps"] == 2 and got["adapter_tensors"] > 0


def test_one_process_fsdp_needs_both_torchrun_and_the_flag(monkeypatch):
    monkeypatch.setenv("LORAKIT_FSDP_ONE_PROCESS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="this is one process"):
        fsdp.resolve_mode("fsdp", Dist())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fsdp.resolve_mode("fsdp", Dist()) == "fsdp"
    monkeypatch.delenv("LORAKIT_FSDP_ONE_PROCESS")
    with pytest.raises(ConfigError, match="this is one process"):
        fsdp.resolve_mode("fsdp", Dist())


def test_smoke_skips_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    row = fsdp_smoke.run_smoke()
    assert row["skipped"] == "no CUDA device: the one-GPU FSDP smoke run (bf16, NF4) needs one"
    assert fsdp_smoke.markdown_line(row).startswith("FSDP one-GPU smoke (bf16, NF4): not run: no CUDA device")


def test_the_harness_runs_it_for_the_gpu_suite_only():
    assert fsdp_smoke.CASE in run.default_cases("gpu") and fsdp_smoke.CASE not in run.default_cases("cpu-small")
    res = run.run_suite("smoke", [fsdp_smoke.CASE])  # a CPU suite: reported as not run, with the reason
    row = res["rows"]["fsdp_smoke/lorakit"]
    assert "runs on cpu; the FSDP smoke run is for --suite gpu" in row["skipped"]
    assert "FSDP one-GPU smoke (bf16, NF4): not run: suite 'smoke' runs on cpu" in run.markdown(res)
