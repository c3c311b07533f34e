"""`mixed_precision: auto` picks bf16 where the CPU computes it natively and fp32 elsewhere, and says why
(issue 16 item 1); requests the CPU cannot honour warn or fail in one line."""

import warnings

import pytest
import torch

from lorakit.config import ConfigError
from lorakit.train.precision import cpu_bf16_flags, resolve_precision

CPU = torch.device("cpu")


def test_auto_on_a_cpu_with_native_bf16_is_bf16():
    p = resolve_precision("auto", CPU, cpu_flags=("avx512_bf16",))
    assert (p.name, p.dtype) == ("bf16", torch.bfloat16) and "avx512_bf16" in p.why


def test_auto_on_a_cpu_without_native_bf16_is_fp32():
    p = resolve_precision("auto", CPU, cpu_flags=())
    assert (p.name, p.dtype) == ("fp32", None) and "no native bf16" in p.why


def test_auto_follows_this_machines_flags():
    p = resolve_precision("auto", CPU)
    assert p.name == ("bf16" if cpu_bf16_flags() else "fp32")


def test_bf16_on_a_cpu_without_it_warns_and_fp16_on_cpu_fails():
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16", CPU, cpu_flags=()).name == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", CPU, cpu_flags=("amx_bf16",))
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA device"):
        resolve_precision("fp16", CPU)
    assert resolve_precision("no", CPU, cpu_flags=("avx512_bf16",)).name == "fp32"


def test_the_run_says_which_precision_and_why_and_which_optimizer(tmp_path, capsys):
    from lorakit.train.trainer import train
    from train.test_trainer import run_config

    res = train(run_config(tmp_path, max_steps=2))
    out = capsys.readouterr().out
    assert res.summary["precision_why"].startswith("auto: ") and f"precision {res.summary['precision']} (auto: " in out
    assert res.summary["optimizer"] == "adamw (fused)" and res.summary["compile"] == "off"


def test_mixed_precision_no_survives_yaml(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` (and `--set training.mixed_precision=no`) as False."""
    from lorakit.train.config import load_run_config

    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny-llama}\ndata: {train: d.jsonl}\ntraining: {mixed_precision: no}\n"
                    "output: {dir: out}\n")
    assert load_run_config(str(path)).training.mixed_precision == "no"
    assert load_run_config(str(path), ["training.mixed_precision=no"]).training.mixed_precision == "no"
