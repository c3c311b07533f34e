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


def test_decode_case_and_speed_goals_summarise():
    """The decode case times the plain base and LoRA in one process; the ratios and goal table follow."""
    pytest.importorskip("peft")
    from benchmarks.bench_speed import goal_lines
    from benchmarks.worker import decode

    suite = SUITES["smoke"]
    raw = {("decode", side): [decode(side, suite)] for side in ("lorakit", "peft")}
    res = summarize("smoke", raw, 1.0)
    d = res["ratios"]["decode"]
    row = res["rows"]["decode/lorakit"]
    assert d["vs_base"] == pytest.approx(row["decode_lora_s"] / row["decode_base_s"])
    assert d["vs_peft"] == pytest.approx(row["decode_lora_s"] / res["rows"]["decode/peft"]["decode_lora_s"])
    assert "decode, 32 rows x 1 token" in markdown(res)
    table = "\n".join(goal_lines(res))
    assert "| decode vs PEFT, wall |" in table and "| QLoRA step vs PEFT+bnb, wall | — |" in table
