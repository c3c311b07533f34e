"""plan() API, its bad-input errors, the report files and the CLI."""

from __future__ import annotations

import json

import pytest

from lorakit.cli.main import main
from lorakit.planner.arch import PlanError
from lorakit.planner.calibrate import matmul_rate
from lorakit.planner.plan import Plan, plan
from lorakit.planner.plan_report import table, to_json, write_report


@pytest.fixture(scope="module")
def small_plan() -> Plan:
    return plan(
        "7B", tokens=5_000_000, method="lora", gpu="A100-80GB", benefit_per_month=4000, horizon_months=6
    )


def test_plan_has_every_method_and_numbers_tied_recommendations(small_plan):
    p = small_plan
    assert p.selected.method == "lora" and set(p.methods) == {"full", "lora", "qlora", "dora"}
    # 108 GiB of full fine-tuning states do not fit one 80 GB GPU, and DDP puts them on every GPU
    assert p.methods["full"].gpus is None and p.methods["lora"].gpus == 1
    assert p.methods["qlora"].single_gpu_memory.total < p.methods["lora"].single_gpu_memory.total
    assert p.selected.roi.roi == pytest.approx(
        (6 * 4000 - p.selected.training_cost - 6 * p.selected.serving_cost_per_month)
        / (p.selected.training_cost + 6 * p.selected.serving_cost_per_month)
    )
    cheapest = min((m for m in p.methods.values() if m.fits), key=lambda m: m.training_cost)
    assert p.recommendations[0].startswith(f"Cheapest method that fits: {cheapest.method} at $")
    assert any("Risk, cost overrun" in r for r in p.recommendations)
    assert all(any(ch.isdigit() for ch in r) for r in p.recommendations)


def test_outputs_table_json_markdown_chart(small_plan, tmp_path):
    assert "Recommendations:" in table(small_plan)
    data = json.loads(to_json(small_plan))
    assert data["selected"] == "lora" and data["methods"]["lora"]["memory"]["unit"] == "GiB"
    paths = write_report(small_plan, str(tmp_path))
    with open(paths["chart"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "plan_chart.png" in md and "| lora * |" in md
    assert json.load(open(paths["json"]))["params"]["total"] == 6_738_415_616


def test_dataset_rows_times_seq_len():
    p = plan("tiny-llama", dataset_rows=100, seq_len=64, epochs=2)
    assert p.tokens_per_epoch == 6400 and p.total_tokens == 12800


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(tokens=0), "tokens"),
        (dict(tokens=-5), "tokens"),
        (dict(dataset_rows=0), "dataset_rows"),
        (dict(tokens=100, seq_len=0), "seq_len"),
        (dict(tokens=100, epochs=0), "epochs"),
        (dict(tokens=100, r=0), "r="),
        (dict(tokens=100, gpus=0), "gpus"),
        (dict(tokens=100, mfu=1.5), "mfu"),
        (dict(tokens=100, horizon_months=0), "horizon_months"),
        (dict(tokens=100, price_per_hour=-1), "price_per_hour"),
        (dict(tokens=100, micro_batch=0), "micro_batch"),
        (dict(tokens=100, method="prefix"), "method"),
        (dict(), "exactly one data size"),
        (dict(tokens=1, dataset_rows=1), "exactly one data size"),
    ],
)
def test_bad_input_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        plan("tiny-llama", **kw)


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(PlanError, match=r"known GPUs: .*A100-80GB.*H100-80GB"):
        plan("tiny-llama", tokens=100, gpu="B200")


def test_model_that_fits_nowhere():
    with pytest.raises(PlanError, match="fits on no GPU"):
        plan("175B", tokens=100, method="full", seq_len=32768, micro_batch=64, grad_checkpointing=False)


def test_explicit_gpu_count_too_small_says_how_many():
    with pytest.raises(PlanError, match=r"does not fit 1 x A100-80GB .*whole model.*fits on: H200-141GB x1$"):
        plan("7B", tokens=100, method="full", gpu="A100-80GB", gpus=1)


def test_user_gpu_table(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps({"gpus": {"MyCard": {"memory_gb": 24, "peak_tflops": 100, "price_per_hour": 0.5}}})
    )
    p = plan("tiny-llama", tokens=1000, gpu="mycard", gpu_table=str(path))
    assert p.gpu.name == "MyCard" and p.selected.fits_on == {"MyCard": 1}
    path.write_text(json.dumps({"gpus": {"Bad": {"memory_gb": 0, "peak_tflops": 1, "price_per_hour": 1}}}))
    with pytest.raises(PlanError, match="memory_gb"):
        plan("tiny-llama", tokens=1000, gpu_table=str(path))


def test_cli_plan_json_and_errors(capsys):
    assert main(["plan", "--model", "tiny-llama", "--tokens", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == 124224
    assert main(["plan", "--model", "tiny-llama", "--tokens", "1000", "--gpu", "nope"]) == 2
    assert "known GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--help"])


def test_matmul_rate_probe_is_positive():
    wall, cpu = matmul_rate([(32, 32, 32)], reps=2)
    assert wall > 0 and cpu > 0
