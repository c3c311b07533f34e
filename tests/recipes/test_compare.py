"""compare on two small builtin configs: every column for every row, charts written."""

import json
import os

import pytest

from lorakit.recipes.compare import COLUMNS, derive_configs, run_compare


def _config(tmp_path, method: str) -> dict:
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        rows = [{"prompt": f"count to {i}:", "completion": " " + " ".join(str(j) for j in range(i % 7 + 2))}
                for i in range(40)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": {"name": "tiny-llama"},
        "data": {"train": str(data), "val_fraction": 0.2, "task": "sft", "max_length": 64},
        "adapter": {"method": method, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 3, "batch_size": 4, "grad_accumulation": 1, "lr": 1e-3, "num_workers": 0,
                     "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / method), "save_every": 0},
    }


def test_derive_configs_changes_only_the_method():
    base = {"model": {"name": "m"}, "adapter": {"r": 8, "target_modules": ["q_proj"]}}
    d = derive_configs(base, ["full", "lora", "dora", "qlora", "adalora"])
    assert d["full"]["adapter"] == {"method": "full"}
    assert d["dora"]["adapter"]["method"] == "dora" and d["dora"]["adapter"]["r"] == 8
    assert d["qlora"]["quant"]["dtype"] == "nf4" and d["qlora"]["adapter"]["method"] == "lora"
    assert d["adalora"]["adapter"]["target_r"] == 8 and d["adalora"]["adapter"]["init_r"] == 12
    with pytest.raises(ValueError, match="unknown method 'prefix'"):
        derive_configs(base, ["prefix"])


def test_derive_configs_names_the_inits_and_loraplus():
    """loftq = QLoRA with LoftQ's init, olora = LoRA with OLoRA's, loraplus = LoRA with B's lr x16; each
    derived config is a valid run config."""
    from lorakit.train.config import RunConfig

    base = {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}, "output": {"dir": "out"},
            "adapter": {"r": 8, "target_modules": ["q_proj"]}}
    d = derive_configs(base, ["loftq", "olora", "loraplus"])
    assert d["loftq"]["adapter"]["init"] == "loftq" and d["loftq"]["quant"]["dtype"] == "nf4"
    assert d["olora"]["adapter"]["init"] == "olora" and "quant" not in d["olora"]
    assert d["loraplus"]["adapter"]["method_options"] == {"loraplus_lr_ratio": 16}
    for cfg in d.values():
        assert RunConfig.from_dict(cfg).adapter.method == "lora"


@pytest.mark.slow
def test_compare_two_builtin_configs(tmp_path):
    configs = {"lora": _config(tmp_path, "lora"), "dora": _config(tmp_path, "dora")}
    out = tmp_path / "cmp"
    rows = run_compare(configs, str(out))
    assert [r["name"] for r in rows] == ["lora", "dora"]
    for r in rows:
        assert set(r) == set(COLUMNS)
        assert all(r[c] is not None for c in COLUMNS), r
        assert isinstance(r["learned"], bool) and r["verdict"].startswith("learned" if r["learned"] else "not")
        assert r["steps"] == 3 and r["precision"] in ("fp32", "bf16") and r["metric_before"] == r["baseline"]
        assert r["trainable_params"] > 0 and r["latency_unmerged_ms"] > 0 and r["adapter_bytes"] > 0
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]  # DoRA adds the magnitude vectors
    with open(out / "compare.json") as f:
        assert json.load(f) == rows
    for name in ("compare.md", "compare_metric.png", "compare_latency.png", "compare_memory.png"):
        assert os.path.getsize(out / name) > 0


def test_a_corda_configuration_is_measured_in_process(tmp_path):
    """compare's worker rebuilds the model to time it; CorDA's init needs calibration rows there too (it
    failed with "build_run_model got no calibrate"): the timing model takes the trained, converted file."""
    from lorakit.recipes.compare_worker import measure

    cfg = _config(tmp_path, "lora")
    cfg["adapter"].update(init="corda", method_options={"corda_rows": 4})
    cfg["training"]["max_steps"] = 2
    row = measure(cfg)
    assert row["metric"] is not None and row["latency_unmerged_ms"] > 0
