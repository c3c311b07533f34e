"""Experiment tracking: TensorBoard, MLflow and Trackio as sinks of the records metrics.jsonl holds.

``training.report_to: [tensorboard, mlflow, trackio]`` (any subset; none by default). Each tool is driven by
its own writer, offline and local:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in ``<output.dir>/tb``
  (``tensorboard --logdir <output.dir>/tb``).
- ``mlflow``: ``MlflowClient`` on the file store ``file://<output.dir>/mlruns``, experiment ``lorakit``
  (``mlflow ui --backend-store-uri <output.dir>/mlruns``). MLflow 3 puts the file store in maintenance
  mode behind ``MLFLOW_ALLOW_FILE_STORE``; lorakit sets it around its own calls only (mlflow-skinny has no
  SQL backend).
- ``trackio``: ``trackio.init/log`` into Trackio's local store (``$TRACKIO_DIR``, default
  ``$HF_HOME/trackio``), project ``lorakit``, one run per output dir (``trackio show --project lorakit``).
  Trackio sends to a Space or server only when ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` say so.

Every record the trainer writes to metrics.jsonl (``lorakit.train.steplog``) goes to every tracker as it is
written there, after the same cleaning (``MetricsLog.write``): the numbers cannot disagree. A record's
numeric fields other than ``step`` are logged at its ``step`` under the same names (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``, ``eval_loss``, ...); a field that is None or not finite (a skipped step's
grad norm) is left out. The run config goes in as text / params / config at the start; at the end
``summary.json`` and ``loss_curve.png`` go in as artifacts (TensorBoard: text and an image).

Only rank 0 reports. A resumed run continues the same run and step axis: TensorBoard purges the events
after the checkpoint's step (``purge_step``); MLflow and Trackio continue the run recorded in
``<output.dir>/tracking.json`` and, having no delete, keep both values of a step that was logged after the
checkpoint and again by the resumed run (the later one is the resumed run's).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from lorakit.errors import ConfigError

TOOLS = ("tensorboard", "mlflow", "trackio")
_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}
EXTRA = 'pip install "lorakit[track]"'
STATE_FILE = "tracking.json"
# What trackers leave in the output directory (``lorakit.train.checkpoint.ARTIFACTS`` lists them too).
ARTIFACTS = ("tb", "mlruns", STATE_FILE)


class Tracker(Protocol):
    """One experiment tracker: fed every metrics record, told when the run's directory moves, closed with
    the run's artifacts."""

    def log(self, record: dict[str, Any]) -> None: ...

    def pause(self) -> None:
        """The run's directory is about to move: close any file open inside it."""

    def move(self, out: str) -> None:
        """The run's directory is now ``out``."""

    def finish(self, artifacts: Sequence[str]) -> None: ...

    def abort(self) -> None: ...


def check_installed(names: Sequence[str]) -> None:
    """Each tool in ``names`` can be imported; else a one-line ``ConfigError`` naming the extra."""
    for name in names:
        if importlib.util.find_spec(_MODULE[name]) is None:
            raise ConfigError(f"training.report_to: {name!r} needs the {_MODULE[name]} package: {EXTRA}")


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, the record's finite numbers other than ``step``): what a tracker logs of a record."""
    out = {}
    for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return int(record["step"]), out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"lr": 2e-4}}`` -> ``{"training.lr": "0.0002"}`` (MLflow params, Trackio config)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


def open_trackers(
    names: Sequence[str],
    out: str,
    config: dict[str, Any],
    resume_step: int | None,
    run_name: str | None = None,
    staged: bool = False,
) -> list[Tracker]:
    """Start (``resume_step`` None) or continue the trackers ``names`` of the run writing into ``out``;
    rank 0 only. ``run_name``: the run's name in MLflow / Trackio (default: ``out``'s basename);
    ``staged``: ``out`` is an --overwrite run's staging directory, to be moved (``Tracker.move``)."""
    if not names:
        return []
    check_installed(names)
    state = _read_state(out) if resume_step is not None else {}
    name = run_name or os.path.basename(os.path.normpath(out))
    made: list[Tracker] = []
    for tool in names:
        cls = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}[tool]
        made.append(cls(out, name, config, resume_step, state, staged))
    _write_state(out, state)
    return made


def _read_state(out: str) -> dict[str, Any]:
    path = os.path.join(out, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_state(out: str, state: dict[str, Any]) -> None:
    from lorakit.io.atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    atomic_write(os.path.join(out, STATE_FILE), write)


class TensorBoardTracker:
    """Scalars per record, the config as text; the summary as text and the loss curve as an image."""

    def __init__(
        self, out: str, name: str, config: dict[str, Any], resume_step: int | None, state: dict[str, Any],
        staged: bool = False,
    ):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events after its checkpoint, as metrics.jsonl drops those records
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=os.path.join(out, "tb"), purge_step=purge, flush_secs=10)
        self.paused = False
        if resume_step is None:
            self.writer.add_text("config", _code(json.dumps(config, indent=2)), 0)

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def pause(self) -> None:
        """TensorBoard's writer reopens its file by path: close it before the directory moves."""
        self.writer.close()
        self.paused = True

    def move(self, out: str) -> None:
        """Go on in a new event file in ``out/tb`` (readers join a directory's event files)."""
        from torch.utils.tensorboard import SummaryWriter

        if self.paused:
            self.writer = SummaryWriter(log_dir=os.path.join(out, "tb"), flush_secs=10)
            self.paused = False

    def finish(self, artifacts: Sequence[str]) -> None:
        for path in artifacts:
            if path.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    self.writer.add_text(os.path.basename(path), _code(f.read()), 0)
            elif path.endswith(".png"):
                import matplotlib.image

                image = matplotlib.image.imread(path)  # HxWx{3,4} floats in [0, 1]
                self.writer.add_image(os.path.basename(path), image[..., :3], 0, dataformats="HWC")
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()


def _code(text: str) -> str:
    """TensorBoard renders text as Markdown: indent it as a code block so JSON keeps its layout."""
    return "\n".join("    " + line for line in text.splitlines())


@contextlib.contextmanager
def _file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: set it for our calls."""
    old = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = old


class MlflowTracker:
    """One MLflow run in the file store ``<out>/mlruns``: metrics per record, the config as params and an
    artifact; summary.json and loss_curve.png as artifacts at the end.

    MLflow records each run's artifact location as an absolute path, so a store must not move: an
    --overwrite run (``staged``) keeps its records in memory until its directory is swapped in, then
    opens the store there and logs them."""

    EXPERIMENT = "lorakit"

    def __init__(
        self, out: str, name: str, config: dict[str, Any], resume_step: int | None, state: dict[str, Any],
        staged: bool = False,
    ):
        self.name, self.config, self.state = name, config, state
        self.pending: list[dict[str, Any]] | None = [] if staged else None
        self.run_id: str | None = None
        if not staged:
            self._open(out, state.get("mlflow_run_id") if resume_step is not None else None)

    def _open(self, out: str, run_id: str | None) -> None:
        from mlflow.store.tracking.file_store import FileStore
        from mlflow.tracking import MlflowClient

        uri = "file://" + os.path.abspath(os.path.join(out, "mlruns"))
        with _file_store_allowed():
            # MLflow caches one store object per URI for the process, and a cached one does not recreate
            # a directory replaced since (an --overwrite run in the same process): FileStore's own
            # constructor lays the store out on disk first
            FileStore(uri)
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                exp = self.client.get_experiment_by_name(self.EXPERIMENT)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.EXPERIMENT)
                run_id = self.client.create_run(exp_id, run_name=self.name).info.run_id
                self._log_config(run_id)
            else:
                self.client.update_run(run_id, status="RUNNING")
        self.run_id = self.state["mlflow_run_id"] = run_id

    def _log_config(self, run_id: str) -> None:
        from mlflow.entities import Param

        params = [Param(k[:250], v[:6000]) for k, v in flat_config(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_dict(run_id, self.config, "run_config.json")

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self.pending is not None:
            self.pending.append(record)
            return
        step, values = scalars(record)
        now = int(time.time() * 1000)
        with _file_store_allowed():
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def pause(self) -> None:
        """Nothing stays open in the file store between calls."""

    def move(self, out: str) -> None:
        """The run's directory was swapped in at ``out``: open the store there and log what waited."""
        if self.pending is None:
            raise RuntimeError("MlflowTracker.move: only a staged (--overwrite) run moves")
        pending, self.pending = self.pending, None
        self._open(out, None)
        _write_state(out, self.state)
        for record in pending:
            self.log(record)

    def finish(self, artifacts: Sequence[str]) -> None:
        with _file_store_allowed():
            for path in artifacts:
                self.client.log_artifact(self.run_id, path)
            self.client.set_terminated(self.run_id)

    def abort(self) -> None:
        if self.run_id is not None:  # a staged run that never swapped in has no MLflow run
            with _file_store_allowed():
                self.client.set_terminated(self.run_id, status="FAILED")


class TrackioTracker:
    """One Trackio run in its local store: metrics per record (at the record's step), the flattened config;
    summary.json and loss_curve.png as artifacts at the end."""

    PROJECT = "lorakit"

    def __init__(
        self, out: str, name: str, config: dict[str, Any], resume_step: int | None, state: dict[str, Any],
        staged: bool = False,
    ):
        import trackio

        self.trackio = trackio
        resumed = state.get("trackio_run") if resume_step is not None else None
        resume = "must" if resumed else "never"
        name = resumed or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"  # unique in the project
        self.run = trackio.init(
            project=self.PROJECT, name=name, config=flat_config(config), resume=resume, embed=False,
            auto_log_cpu=False, auto_log_gpu=False,
        )
        state["trackio_project"], state["trackio_run"] = self.PROJECT, name
        self.name = name

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def pause(self) -> None:
        """Trackio's store is not in the run's directory: nothing to do."""

    def move(self, out: str) -> None:
        """Trackio's store is not in the run's directory: nothing to do."""

    def finish(self, artifacts: Sequence[str]) -> None:
        for path in artifacts:
            stem = os.path.splitext(os.path.basename(path))[0]
            self.run.log_artifact(path, name=f"{self.name}-{stem}", type="summary")
        self.trackio.finish()

    def abort(self) -> None:
        self.trackio.finish()
