"""The utilisation formula of benchmarks/bench_mfu.py against the equation written out from the model config, and
the new harness cases (bf16 step, real vocabulary, MFU) at smoke size."""

import pytest
import torch

from benchmarks.bench_mfu import build, measure, step_flops
from benchmarks.suites import SUITES
from benchmarks.worker import train_steps


def test_step_flops_is_the_written_out_equation():
    model = build("fp32", "tiny-llama")
    c = model.config
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = d // c.num_attention_heads * c.num_key_value_heads
    p_lin = L * (d * d + 2 * d * kv + d * d + 3 * d * f) + d * V  # q, k, v, o, gate/up/down, LM head
    B, T, r = 3, 16, 8
    n = B * T
    attn = 4 * B * T * T * d * L
    adapter = L * 6 * n * r * ((d + d) + (d + kv))  # q: d -> d, v: d -> kv
    got = step_flops(model, B, T)
    assert got["p_lin"] == p_lin
    assert got["total"] == pytest.approx(2 * (2 * n * p_lin) + 3 * attn + adapter)


def test_mfu_measure_reports_a_fraction_of_the_matmul_rate():
    res = measure("bf16_base", "tiny-llama", 2, 32, 1, 2)
    assert res["mfu"] == pytest.approx(res["gflop"] / res["step_s"] / res["rate_gflops"])
    assert 0 < res["mfu"] and res["loss_step1"] == pytest.approx(torch.log(torch.tensor(260.0)).item(), rel=0.1)


@pytest.mark.parametrize("case", ["lora_qv_bf16", "lora_qv_vocab"])
def test_bf16_cases_compute_the_same_loss_on_both_sides(case):
    pytest.importorskip("peft")
    suite = SUITES["smoke"]
    a = train_steps(case, "lorakit", suite)
    b = train_steps(case, "peft", suite)
    assert a["trainable"] == b["trainable"]
    assert abs(a["loss_step1"] - b["loss_step1"]) <= 1e-2
