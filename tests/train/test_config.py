"""Run configs: the source document's defaults, --set overrides, path resolution, and one-line errors."""

from __future__ import annotations

import os

import pytest
import yaml

from lorakit.config import ConfigError
from lorakit.train.config import RunConfig, apply_overrides, default_workers, load_run_config

MINIMAL = {"model": {"name": "tiny-llama"}, "data": {"train": "data/train.jsonl"}, "output": {"dir": "out"}}


def write(tmp_path, data, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_are_the_source_documents(tmp_path):
    cfg = load_run_config(write(tmp_path, MINIMAL))
    a, t = cfg.adapter, cfg.training
    assert (a.method, a.r, a.alpha, a.dropout, a.target_modules) == ("lora", 8, 16.0, 0.1, None)
    assert (t.lr, t.epochs, t.batch_size, t.grad_accumulation) == (2e-4, 3, 4, 8)
    assert (t.optimizer, t.weight_decay, t.warmup_ratio, t.schedule) == ("adamw", 0.01, 0.03, "linear")
    assert (t.mixed_precision, t.gradient_checkpointing, t.max_grad_norm) == ("auto", True, 1.0)
    assert cfg.workers == default_workers() == max(0, min(4, (os.cpu_count() or 1) - 1))
    assert cfg.quant is None and cfg.output.keep_last == 2


def test_paths_resolve_against_the_config_dir_and_set_against_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(path)
    assert cfg.data.train == str(sub / "data" / "train.jsonl")
    assert cfg.output.dir == str(sub / "out")
    cfg = load_run_config(path, ["data.train=other.jsonl", "output.dir=/abs/out"])
    assert cfg.data.train == str(tmp_path / "other.jsonl") and cfg.output.dir == "/abs/out"


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_run_config(write(tmp_path, MINIMAL), [
        "training.lr=1e-4", "training.epochs=5", "adapter.target_modules=[q_proj, k_proj]",
        "training.gradient_checkpointing=false", "data.fields={text: sentence}", "quant.dtype=nf4",
        "training.max_grad_norm=null",
    ])
    assert cfg.training.lr == 1e-4 and cfg.training.epochs == 5  # "1e-4" is a YAML string: read as float
    assert cfg.adapter.target_modules == ("q_proj", "k_proj")
    assert cfg.training.gradient_checkpointing is False and cfg.training.max_grad_norm is None
    assert cfg.data.fields == {"text": "sentence"} and cfg.quant.dtype == "nf4"


def test_round_trip_through_dict(tmp_path):
    cfg = load_run_config(write(tmp_path, MINIMAL), ["quant.blocksize=128", "training.betas=[0.9, 0.95]"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"trainig": {}}, "unknown section 'trainig' (did you mean 'training'?)"),
        ({"training": {"learning_rate": 1}}, "training: unknown key 'learning_rate'"),
        ({"training": {"batch_sise": 1}}, "did you mean 'batch_size'?"),
        ({"adapter": {"rank": 4}}, "adapter: unknown key 'rank'"),
        ({"adapter": {"target_module": ["q"]}}, "did you mean 'target_modules'?"),
        ({"quant": {"dtyp": "nf4"}}, "did you mean 'dtype'?"),
        ({"training": {"epochs": "three"}}, "training.epochs='three' has the wrong type: expected int, got str"),
        ({"training": {"epochs": 2.5}}, "training.epochs=2.5 has the wrong type: expected int"),
        ({"training": {"lr": "fast"}}, "training.lr='fast' is invalid; expected a positive number (e.g. 2e-4) or 'auto'"),
        ({"training": {"gradient_checkpointing": "yes please"}}, "expected bool"),
        ({"data": {"train": "x", "fields": ["text"]}}, "data.fields=['text'] has the wrong type: expected dict"),
        ({"training": {"batch_size": 0}}, "training.batch_size=0 is invalid"),
        ({"training": {"lr": -1.0}}, "training.lr=-1.0"),
        ({"training": {"warmup_ratio": 1.5}}, "warmup_ratio=1.5"),
        ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision='fp8' is not supported"),
        ({"training": {"schedule": "cosin"}}, "did you mean 'cosine'?"),
        ({"data": {"train": "x", "task": "regression"}}, "data.task='regression'"),
        ({"adapter": {"r": 0}}, "r=0 is invalid"),
        ({"data": {"train": "x", "validation": "v", "val_fraction": 0.1}}, "not both"),
        ({"training": {"compile": True, "distributed": "fsdp"}}, "training.compile=true with distributed='fsdp'"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_field(tmp_path, change, fragment):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, data))
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg and msg.startswith(str(tmp_path))


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"data": {"train": "x"}, "output": {"dir": "o"}}, "section 'model' is missing"),
        ({"model": {}, "data": {"train": "x"}, "output": {"dir": "o"}}, "model.name is missing"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_structural_errors(tmp_path, data, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_run_config(write(tmp_path, data))
    assert fragment in str(err.value)


def test_missing_config_file_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="must name a section and a field"):
        apply_overrides({}, ["lr=1"])


def test_full_finetuning_config(tmp_path):
    base = {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}, "output": {"dir": str(tmp_path)}}
    cfg = RunConfig.from_dict({**base, "adapter": {"method": "full"}})
    assert cfg.adapter is None and RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="takes no other keys"):
        RunConfig.from_dict({**base, "adapter": {"method": "full", "r": 4}})
    with pytest.raises(ConfigError, match="quantized base"):
        RunConfig.from_dict({**base, "adapter": {"method": "full"}, "quant": {"dtype": "nf4"}})
