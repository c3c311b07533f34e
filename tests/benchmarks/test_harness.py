"""The benchmark harness computes the same thing on both sides and summarises correctly (smoke size)."""

import pytest

from benchmarks.run import markdown, summarize
from benchmarks.suites import SUITES
from benchmarks.worker import inference, train_steps


@pytest.mark.parametrize("case", ["lora_qv", "dora_qv"])
def test_both_sides_compute_the_same_loss(case):
    pytest.importorskip("peft")
    suite = SUITES["smoke"]
    a = train_steps(case, "lorakit", suite)
    b = train_steps(case, "peft", suite)
    assert a["trainable"] == b["trainable"]
    assert abs(a["loss_step1"] - b["loss_step1"]) <= 1e-5
    assert len(a["step_times"]) == suite.steps


def test_summary_and_markdown_from_measurements():
    suite = SUITES["smoke"]
    raw = {("floor", "torch"): [train_steps("floor", "torch", suite)],
           ("lora_qv", "lorakit"): [train_steps("lora_qv", "lorakit", suite)],
           ("infer", "lorakit"): [inference("lorakit", suite)]}
    res = summarize("smoke", raw, 1.0)
    assert res["rows"]["floor/torch"]["trainable"] == 0
    r = res["ratios"]["lora_qv"]
    assert r["time_vs_floor"] == pytest.approx(res["rows"]["lora_qv/lorakit"]["step_s"] / res["rows"]["floor/torch"]["step_s"])
    assert "infer_merged_vs_base" in res["ratios"]
    md = markdown(res)
    assert "| lora_qv | lorakit |" in md and "inference" in md
