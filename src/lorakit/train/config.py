"""One YAML file describes a training run: sections ``model``, ``data``, ``adapter``, ``quant`` (optional),
``training`` and ``output``.

Defaults are lorakit's, after the LoRA paper and PEFT / HF Trainer conventions (LoRA r 8, alpha 16, dropout 0.1 on the
query/value projections; AdamW lr 2e-4, 3 epochs, batch 4, gradient accumulation 8, weight decay 0.01, 3%
linear warmup, mixed precision, gradient checkpointing, loader workers). ``--set a.b=value`` overrides any
field; the value is parsed as YAML (``--set adapter.target_modules=[q_proj,k_proj]``).

Relative paths (``data.train``, ``data.validation``, ``output.dir``, a ``model.name`` that starts with
``.``) resolve against the directory of the config file when written in the file, and against the current
directory when given with ``--set``.

Every error is a ``ConfigError`` (a ``ValueError``) on one line: unknown keys name the closest allowed
key, wrong types name the field and the expected type. Numbers must be finite, integers fit in 64 bits,
names and paths are non-blank strings; a section is a mapping or left empty (null: its defaults).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit import methods
from lorakit.config import AdapterConfig, ConfigError, QuantConfig
from lorakit.errors import did_you_mean, show
from lorakit.train.data import DataError, parse_fields
from lorakit.train.tasks import SFT_FORMATS
from lorakit.train.tracking import TOOLS
from lorakit.validation import DTYPES, check_choice, check_number, mapping, named, read_section, yaml_floats

MIXED_PRECISION = ("auto", "no", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
TASKS = ("sft", "classification")
BATCHING = ("group", "pad", "pack")
DISTRIBUTED = ("none", "ddp", "fsdp")  # data parallelism: one process, replicas (DDP), shards (FSDP2)
MAX_TIMEOUT_S = 7 * 24 * 3600  # training.distributed_timeout_s at most (a week; timedelta-safe)
# The run config's adapter defaults (r 8, alpha 16, dropout 0.1 on q/v); AdapterConfig's own defaults (dropout 0.0) are PEFT's.
ADAPTER_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": None}


def default_workers() -> int:
    """DataLoader workers the machine can spare: min(4, cpus - 1), at least 0."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class ModelSection:
    """name: builtin name (tiny-llama, llama-15m, minilm, ...), a local HF model directory or a hub id.
    dtype: weights of the frozen base ("auto": bfloat16 when the training precision is bf16, on CPU or GPU, so
    autocast does not cast every frozen weight at every matmul; float32 otherwise; trainable tensors stay float32). tokenizer: a directory to load the tokenizer from (default: the model's, byte-level for
    builtins)."""

    name: str
    dtype: str = "auto"
    tokenizer: str | None = None


@dataclass(frozen=True)
class DataSection:
    """train / validation: JSONL, JSON array, CSV or TSV files; val_fraction holds out a share of train
    when there is no validation file. fields maps lorakit's field names to the file's columns.
    task: "sft" (causal-LM) or "classification". format: SFT row format (auto, messages, alpaca,
    prompt_completion, text). batching: group (length-grouped, dynamic padding), pad or pack.
    max_train_rows / max_val_rows: use a seeded random subset of that many rows."""

    train: str
    validation: str | None = None
    val_fraction: float = 0.0
    task: str = "sft"
    fields: dict[str, str] = field(default_factory=dict)
    format: str = "auto"
    max_length: int = 512
    batching: str = "group"
    max_train_rows: int | None = None
    max_val_rows: int | None = None


@dataclass(frozen=True)
class TrainingSection:
    """The optimisation. batch_size is per process and micro-batch; one optimizer step sees
    batch_size x grad_accumulation x world_size rows. warmup_steps overrides warmup_ratio.
    distributed: none, ddp or fsdp (FSDP2: the base and adapters sharded across processes); None picks ddp
    under torchrun with several processes, none for one. distributed_timeout_s: how long a collective waits
    for the other processes before the job stops with ``PeerLostError`` (a hung, not dead, peer; None:
    PyTorch's default, 30 min for gloo, 10 min for NCCL); at most 7 days. It must exceed the longest time one
    process works while the others wait (model loading, rank 0 writing a checkpoint), or a healthy run stops.
    eval_every: steps between evaluations (None: at the end of each epoch). max_nonfinite: consecutive
    steps with a non-finite loss that stop the run. num_workers None: min(4, cpus - 1). lr "auto": a rate
    by method and model size (``lorakit.train.lr_rule``; the summary records it as ``lr_auto``).
    compile: torch.compile each decoder block (opt-in, regional; where the compiler is unavailable it warns and
    trains eagerly; not with FSDP). Measured on a 2-core AVX512-BF16 CPU (benchmarks/bench_trl.py, 44M Llama,
    bf16): a step -27% (0.30 s vs 0.41 s), but the first compile costs ~27 s (~5 s with inductor's warm cache
    from an earlier run), so it pays after a few hundred steps, not in short runs. Dropout masks then come from
    inductor's RNG (with dropout 0 a compiled step matches the eager one to float rounding).
    report_to: experiment trackers fed every metrics.jsonl record, any of tensorboard, mlflow, trackio (a
    string is one; none by default; ``lorakit.train.tracking``).
    return_freed_memory: on Linux (glibc; elsewhere nothing to do), freed tensors of 16 MiB and more go
    back to the OS instead of staying on a fragmenting heap (``lorakit.train.host_memory``): a Qwen2.5-0.5B
    LoRA step on CPU peaks 31% lower (7.8 -> 5.3 GB) for ~15% more step time; small models: no change.
    Process-wide, kept after the run; false keeps glibc's default."""

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accumulation: int = 8
    lr: float | str = 2e-4  # or "auto": by method and model size (lorakit.train.lr_rule)
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    num_workers: int | None = None
    eval_every: int | None = None
    eval_at_start: bool = True
    eval_batch_size: int | None = None
    log_every: int = 1
    max_nonfinite: int = 3
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    return_freed_memory: bool = True
    distributed: str | None = None  # none | ddp | fsdp (None: ddp under several processes, none for one)
    distributed_timeout_s: float | None = None  # a collective waiting longer on a peer fails (None: torch's)
    report_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputSection:
    """dir: where the adapter, checkpoints, metrics.jsonl, loss_curve.png and summary.json go.
    save_every: checkpoint every N optimizer steps (None: at the end of each epoch; 0: never).
    keep_last: checkpoints kept. progress: show the tqdm bar. plot: write loss_curve.png."""

    dir: str
    save_every: int | None = None
    keep_last: int = 2
    progress: bool = True
    plot: bool = True


def _yaml_no(training: dict[str, Any]) -> dict[str, Any]:
    """``mixed_precision: no`` (and ``--set training.mixed_precision=no``) reads as False in YAML 1.1: the
    documented value "no" is what was written."""
    if training.get("mixed_precision") is False:
        training = {**training, "mixed_precision": "no"}
    return _report_to(training)


def _report_to(training: dict[str, Any]) -> dict[str, Any]:
    """``report_to``: a string is one tracker ("none", as in HF Trainer, and null are none)."""
    value = training.get("report_to", ())
    if value is None or value == "none":
        value = ()
    elif isinstance(value, str):
        value = (value,)
    return {**training, "report_to": value} if "report_to" in training else training


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataSection
    adapter: AdapterConfig | None  # None: full fine-tuning (``adapter: {method: full}``), for comparisons
    training: TrainingSection
    output: OutputSection
    quant: QuantConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-able) form; ``RunConfig.from_dict(cfg.to_dict()) == cfg``."""
        d: dict[str, Any] = {}
        for name in ("model", "data", "training", "output"):
            sec = dataclasses.asdict(getattr(self, name))
            d[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        d["adapter"] = {"method": "full"} if self.adapter is None else self.adapter.to_dict()
        if self.quant is not None:
            d["quant"] = self.quant.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | None = None) -> RunConfig:
        """Build and validate; relative paths resolve against ``base_dir`` (default: the current dir)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(data).__name__}")
        sections = ["model", "data", "adapter", "quant", "training", "output"]
        for key in data:
            if key not in sections:
                raise ConfigError(
                    f"unknown section {show(key)}{did_you_mean(str(key), sections)}; sections: {sections}"
                )
        for key in ("model", "data", "output"):
            if key not in data:
                raise ConfigError(f"section {key!r} is missing; a run config needs model, data and output")
        raw_adapter = mapping("adapter", data.get("adapter"), optional=True)
        if raw_adapter.get("method") == "full":
            if set(raw_adapter) != {"method"}:
                extra = sorted(show(k) for k in set(raw_adapter) - {"method"})
                raise ConfigError(
                    f"adapter: method 'full' (full fine-tuning) takes no other keys, got {extra}"
                )
            adapter: AdapterConfig | None = None
        else:
            raw_adapter = yaml_floats(AdapterConfig, {**ADAPTER_DEFAULTS, **raw_adapter})
            adapter = named("adapter", AdapterConfig.from_dict, raw_adapter)
        quant = mapping("quant", data.get("quant"), optional=True)  # empty (null or {}): not quantized
        cfg = cls(
            model=read_section(ModelSection, "model", data["model"]),
            data=read_section(DataSection, "data", data["data"]),
            adapter=adapter,
            training=read_section(TrainingSection, "training", _yaml_no(mapping("training", data.get("training"), True))),
            output=read_section(OutputSection, "output", data["output"]),
            quant=named("quant", QuantConfig.from_dict, quant) if quant else None,
        )
        cfg.validate()
        return cfg.resolve_paths(base_dir or os.getcwd())

    def resolve_paths(self, base_dir: str) -> RunConfig:
        def res(p: str | None) -> str | None:
            return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

        name = self.model.name
        if name.startswith(".") or os.path.isdir(os.path.join(base_dir, name)) and "/" in name:
            name = res(name)
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, name=name, tokenizer=res(self.model.tokenizer)),
            data=dataclasses.replace(
                self.data, train=res(self.data.train), validation=res(self.data.validation)
            ),
            output=dataclasses.replace(self.output, dir=res(self.output.dir)),
        )

    def validate(self) -> None:
        t, d = self.training, self.data
        names = {
            "model.name": self.model.name,
            "model.tokenizer": self.model.tokenizer,
            "data.train": d.train,
            "data.validation": d.validation,
            "output.dir": self.output.dir,
        }
        for name, value in names.items():
            if value is not None and not value.strip():
                raise ConfigError(f"{name}={show(value)} is empty; expected a name or path")
        check_choice("data.format", d.format, ("auto", *SFT_FORMATS))
        try:
            parse_fields(d.fields)
        except DataError as e:
            raise ConfigError(f"data.fields: {e}") from None
        if t.device != "auto":
            try:
                torch.device(t.device)
            except (RuntimeError, ValueError, TypeError):
                raise ConfigError(
                    f"training.device={show(t.device)} is not a device; expected 'auto', 'cpu', 'cuda' or "
                    "'cuda:N'"
                ) from None
        check_choice("training.mixed_precision", t.mixed_precision, MIXED_PRECISION)
        check_choice("training.schedule", t.schedule, SCHEDULES)
        if t.distributed is not None:
            check_choice("training.distributed", t.distributed, DISTRIBUTED)
        if t.distributed_timeout_s is not None:
            check_number("training.distributed_timeout_s", t.distributed_timeout_s, lambda v: 0 < v <= MAX_TIMEOUT_S,
                         f"a number of seconds in (0, {MAX_TIMEOUT_S}]")
        check_choice("training.optimizer", t.optimizer, ("adamw",))
        check_choice("data.task", d.task, TASKS)
        for i, name in enumerate(t.report_to):
            check_choice(f"training.report_to[{i}]", name, TOOLS)
        if len(set(t.report_to)) != len(t.report_to):
            raise ConfigError(f"training.report_to={list(t.report_to)} names a tracker twice")
        check_choice("data.batching", d.batching, BATCHING)
        check_choice("model.dtype", self.model.dtype, ("auto", *DTYPES))
        positive = {
            "training.epochs": t.epochs,
            "training.batch_size": t.batch_size,
            "training.grad_accumulation": t.grad_accumulation,
            "training.log_every": t.log_every,
            "training.max_nonfinite": t.max_nonfinite,
            "data.max_length": d.max_length,
            "output.keep_last": self.output.keep_last,
            "training.max_steps": t.max_steps,
            "training.eval_every": t.eval_every,
            "training.eval_batch_size": t.eval_batch_size,
            "data.max_train_rows": d.max_train_rows,
            "data.max_val_rows": d.max_val_rows,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name}={show(value)} is invalid; expected a positive integer")
        if isinstance(t.lr, str) and t.lr != "auto":
            raise ConfigError(
                f"training.lr={show(t.lr)} is invalid; expected a positive number (e.g. 2e-4) or 'auto'"
            )
        nonneg = {
            "training.weight_decay": t.weight_decay,
            "training.eps": t.eps,
            "training.warmup_steps": t.warmup_steps,
            "training.num_workers": t.num_workers,
            "output.save_every": self.output.save_every,
            "training.max_grad_norm": t.max_grad_norm,
        }
        for name, value in nonneg.items():
            if value is not None and value < 0:
                raise ConfigError(f"{name}={show(value)} is invalid; expected a number >= 0")
        if t.lr != "auto" and t.lr <= 0:
            raise ConfigError(f"training.lr={t.lr!r} is invalid; expected a positive number (e.g. 2e-4)")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(
                f"training.warmup_ratio={t.warmup_ratio!r} is invalid; expected a number in [0, 1)"
            )
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction!r} is invalid; expected a number in [0, 1)")
        if d.validation and d.val_fraction:
            raise ConfigError("data: give either validation (a file) or val_fraction, not both")
        if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
            raise ConfigError(f"training.betas={list(t.betas)} is invalid; expected two numbers in [0, 1)")
        if self.adapter is None and self.quant is not None:
            raise ConfigError("adapter.method='full' cannot train a quantized base; drop the quant section")
        if self.adapter is not None and self.quant is None and methods.init_entry(self.adapter).reads_full_precision:
            raise ConfigError(
                f"adapter.init={self.adapter.init!r} fits the adapter to the quantization error of the base; "
                "add a quant section (e.g. quant: {dtype: nf4})"
            )
        if self.adapter is not None and self.quant is not None and methods.init_entry(self.adapter).reads_inputs:
            raise ConfigError(
                f"adapter.init={self.adapter.init!r} decomposes the dense base weights; it cannot start from a "
                "quantized base: drop the quant section"
            )
        if t.compile and t.distributed == "fsdp":
            raise ConfigError(
                "training.compile=true with distributed='fsdp' is not supported (lorakit compiles the blocks FSDP2 "
                "shards, a combination it does not test); drop one of them"
            )
        if d.batching == "pack" and d.task != "sft":
            raise ConfigError("data.batching='pack' is for causal-LM SFT; use 'group' for classification")

    @property
    def workers(self) -> int:
        n = self.training.num_workers
        return default_workers() if n is None else n


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - only without the hf extra
        raise ConfigError("YAML configs need pyyaml: pip install 'lorakit[hf]'") from e
    return yaml


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], base_dir: str | None = None
) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a raw config mapping, in place.

    Path fields set here are made absolute against the current directory (see the module docstring).
    """
    yaml = _yaml()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {show(item)} must look like section.key=value (e.g. training.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(
                f"--set {show(item)}: the key must name a section and a field, e.g. training.lr"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (
            yaml.YAMLError,
            ValueError,
            RecursionError,
        ) as e:  # ValueError: an int beyond Python's digit limit
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"--set {show(item)}: value is not valid YAML ({first})") from None
        if (
            parts in (["data", "train"], ["data", "validation"], ["output", "dir"], ["model", "tokenizer"])
            and isinstance(value, str)
            and value.strip()  # a blank path stays blank, for validate() to refuse
            and "\x00" not in value
            and not os.path.isabs(value)
        ):
            value = os.path.abspath(value)
        cur = data
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {show(item)}: {p!r} is not a section")
            cur = nxt
        cur[parts[-1]] = value
    return data


def load_run_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, validate, and resolve relative paths against
    the config file's directory."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    yaml = _yaml()
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int beyond the digit limit
            raise ConfigError(
                f"{path}: not valid YAML ({' '.join(str(e).split()) or type(e).__name__})"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, adapter, training, output)")
    apply_overrides(data, overrides)
    try:
        return RunConfig.from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
