"""``training.report_to``: what each tracker holds, read back with the tool's own reader (TensorBoard's
EventAccumulator, MlflowClient on the local file store, Trackio's SQLite store), equals metrics.jsonl,
for a fresh run and for a run resumed after a crash; plus the one-line config errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections import defaultdict

import numpy as np
import pytest

from lorakit.errors import ConfigError
from lorakit.train import tracking
from lorakit.train.callbacks import Callback
from lorakit.train.config import RunConfig
from lorakit.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(tmp_path, report_to, out="out", **training) -> RunConfig:
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            a, b = i % 10, (i * 7) % 10
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    t = dict(max_steps=4, batch_size=2, grad_accumulation=2, lr=1e-2, num_workers=0, gradient_checkpointing=False,
             warmup_steps=1, eval_every=2, report_to=report_to)
    t.update(training)
    return RunConfig.from_dict({
        "model": {"name": "tiny-llama"},
        "data": {"train": str(data), "val_fraction": 0.25},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": t,
        "output": {"dir": str(tmp_path / out), "progress": False, "plot": True, "save_every": 2},
    })


def jsonl(out: str) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {key: {step: value}} over the values a tracker logs (``tracking.scalars``)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for rec in map(json.loads, f):
            step, values = tracking.scalars(rec)
            for k, v in values.items():
                series[k][step] = v
    return dict(series)


def tensorboard_series(out: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        series[tag] = {e.step: e.value for e in events}
    return series, acc


def mlflow_series(out: str):
    """(the run, {key: {step: latest value}}) from the file store under ``out``."""
    from mlflow.tracking import MlflowClient

    with tracking._file_store_allowed():
        client = MlflowClient(tracking_uri="file://" + os.path.join(out, "mlruns"))
        exp = client.get_experiment_by_name("lorakit")
        (run,) = client.search_runs([exp.experiment_id])
        series = {}
        for key in run.data.metrics:
            latest: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(run.info.run_id, key):  # a resumed step: the later value
                if m.step not in latest or m.timestamp >= latest[m.step][0]:
                    latest[m.step] = (m.timestamp, m.value)
            series[key] = {s: v for s, (_, v) in latest.items()}
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    return run, series, artifacts


def as_float32(series: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard scalars are float32: compare at float32, exactly."""
    return {k: {s: float(np.float32(v)) for s, v in d.items()} for k, d in series.items()}


def check_expected_keys(expected: dict[str, dict[int, float]]) -> None:
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
        assert key in expected, key
    assert sorted(expected["eval_loss"])[-2:] == [2, 4] and sorted(expected["loss"]) == [1, 2, 3, 4]


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(tmp_path):
    cfg = config(tmp_path, ["tensorboard", "mlflow"])
    res = train(cfg)
    out = res.output_dir
    expected = jsonl(out)
    check_expected_keys(expected)

    tb, acc = tensorboard_series(out)
    assert tb == as_float32(expected)
    assert {"config/text_summary", "summary.json/text_summary"} <= set(acc.Tags()["tensors"])
    assert "loss_curve.png" in acc.Tags()["images"]

    run, ml, artifacts = mlflow_series(out)
    assert ml == expected  # float64 in the file store: exact
    assert run.info.status == "FINISHED"
    assert run.data.params["training.lr"] == "0.01" and run.data.params["adapter.r"] == "4"
    assert artifacts == ["loss_curve.png", "run_config.json", "summary.json"]


class Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, state) -> None:
        if state.step + 1 == self.at:
            raise KeyboardInterrupt("simulated kill")


def test_resumed_run_continues_the_same_run_and_step_axis(tmp_path):
    cfg = config(tmp_path, ["tensorboard", "mlflow"], max_steps=6, eval_every=None)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, save_every=2))
    with pytest.raises(KeyboardInterrupt):  # dies in step 4, after logging step 3: checkpoint at 2
        train(cfg, callbacks=[Crash(at=4)])
    out = cfg.output.dir
    run, _, _ = mlflow_series(out)
    assert run.info.status == "FAILED"
    first_id = run.info.run_id
    tb_before, _ = tensorboard_series(out)
    assert sorted(tb_before["loss"]) == [1, 2, 3]
    train(cfg, resume=True)

    expected = jsonl(out)
    assert sorted(expected["loss"]) == [1, 2, 3, 4, 5, 6]
    tb, _ = tensorboard_series(out)  # step 3 of the dead run purged: one value per step, the resumed one
    assert tb == as_float32(expected)
    run, ml, _ = mlflow_series(out)
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert ml == expected


def test_overwrite_run_replaces_the_tracked_run(tmp_path):
    """--overwrite writes into a staging dir that is swapped in at the first checkpoint: the trackers
    follow it, and the old run's tb/ and mlruns/ go with the old run."""
    first = config(tmp_path, ["tensorboard", "mlflow"], max_steps=2, eval_every=None, lr=1e-3)
    train(first)
    second = config(tmp_path, ["tensorboard", "mlflow"], eval_every=None)  # 4 steps, checkpoint at 2
    train(second, overwrite=True)
    out = second.output.dir
    expected = jsonl(out)
    assert sorted(expected["loss"]) == [1, 2, 3, 4]
    tb, _ = tensorboard_series(out)
    assert tb == as_float32(expected)
    run, ml, artifacts = mlflow_series(out)  # one run: the new one, whole
    assert ml == expected and run.data.params["training.lr"] == "0.01" and "summary.json" in artifacts
    assert run.info.run_name == "out" and run.info.artifact_uri.startswith("file://" + out + "/mlruns/")
    assert not os.path.exists(tmp_path / ".out.staging")


TRACKIO_SCRIPT = textwrap.dedent("""
    import json, sys
    from lorakit.train.config import RunConfig
    from lorakit.train.trainer import train
    cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
    train(cfg)
    from trackio.sqlite_storage import SQLiteStorage
    state = json.load(open(cfg.output.dir + "/tracking.json"))
    logs = SQLiteStorage.get_logs(state["trackio_project"], state["trackio_run"])
    print("LOGS " + json.dumps({"logs": logs, "config": SQLiteStorage.get_run_config(state["trackio_project"], state["trackio_run"])}))
""")


def test_trackio_local_store_holds_what_metrics_jsonl_holds(tmp_path):
    # Trackio fixes its store directory at import, so the run goes in a process of its own
    cfg = config(tmp_path, "trackio")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "t.py").write_text(TRACKIO_SCRIPT)
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRACKIO_SPACE_ID", None), env.pop("TRACKIO_SERVER_URL", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "t.py"), str(tmp_path / "cfg.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOGS "))
    got = json.loads(line[5:])
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for entry in got["logs"]:
        for k, v in entry.items():
            if k not in ("step", "timestamp"):
                series[k][entry["step"]] = v
    expected = jsonl(cfg.output.dir)
    check_expected_keys(expected)
    assert dict(series) == expected
    assert got["config"]["training.lr"] == "0.01"
    assert os.listdir(tmp_path / "trackio" / "artifacts" / "lorakit")  # summary.json and the PNG


def test_report_to_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"report_to\[0\]='tensorbord'.*did you mean 'tensorboard'"):
        config(tmp_path, "tensorbord")
    with pytest.raises(ConfigError, match="names a tracker twice"):
        config(tmp_path, ["mlflow", "mlflow"])
    assert config(tmp_path, "none").training.report_to == ()
    assert config(tmp_path, "mlflow").training.report_to == ("mlflow",)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    with pytest.raises(ConfigError, match=r"'mlflow' needs the mlflow package: pip install \"lorakit\[track\]\""):
        train(config(tmp_path, ["tensorboard", "mlflow"]))
    assert not os.path.exists(tmp_path / "out" / "tb")  # it failed before anything was written
