"""The one-GPU FSDP smoke case of ``--suite gpu`` (benchmarks/fsdp_smoke.py): its launch runs here on CPU
(one torchrun process, ``LORAKIT_FSDP_ONE_PROCESS=1``), it skips with a one-line reason without CUDA, and
the harness reports it only for a CUDA suite."""

from __future__ import annotations

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


def test_the_smoke_run_trains_on_cpu_in_one_fsdp_process(tmp_path, monkeypatch):
    """The smoke config with device cpu (fp32), run as torchrun's one process would run it (its
    environment, in this process): the model is FSDP-wrapped on a one-process group and the checks pass."""
    from lorakit.cli.main import main

    cfg = fsdp_smoke.smoke_config(str(tmp_path), "tiny-llama", 2, "cpu")
    _, extra = fsdp_smoke.smoke_command(cfg)
    port = _free_port()
    for k, v in {**extra, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", cfg]) == 0
    assert not torch.distributed.is_initialized()  # the trainer left the group it made
    got = fsdp_smoke.check_run(str(tmp_path / "run"), expect_device="cpu")
    assert got["steps"] == 2 and got["adapter_tensors"] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_the_harness_runs_it_for_the_gpu_suite_only(monkeypatch):
    monkeypatch.setattr(run, "_versions", lambda: {k: "-" for k in ("lorakit", "peft", "torch", "transformers",
                                                                      "python", "machine")})
    assert fsdp_smoke.CASE in run.default_cases("gpu") and fsdp_smoke.CASE not in run.default_cases("cpu-small")
    res = run.run_suite("smoke", [fsdp_smoke.CASE])  # a CPU suite: reported as not run, with the reason
    row = res["rows"]["fsdp_smoke/lorakit"]
    assert "runs on cpu; the FSDP smoke run is for --suite gpu" in row["skipped"]
    assert "FSDP one-GPU smoke (bf16, NF4): not run: suite 'smoke' runs on cpu" in run.markdown(res)
