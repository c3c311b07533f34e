"""Everything the training loop needs before its first step, built from a ``RunConfig``: the datasets
(read, subset, tokenized, checked), the model (built, optionally quantized, adapted, checkpointed) and
the numeric precision.

Precision (``lorakit.train.precision``): mixed precision ``auto`` is bf16 autocast where the device computes bf16
natively (CUDA, and CPUs with AVX512-BF16 / AMX), fp16 autocast with a ``GradScaler`` on CUDA without bf16, fp32
elsewhere. ``model.dtype: auto`` stores the FROZEN base in bf16 whenever the precision is bf16, on CPU as on GPU:
under autocast every frozen fp32 weight would otherwise be cast to bf16 at every matmul (measured: a quarter of a
CPU LoRA step's time, benchmarks/bench_mfu.py), and the base takes half the memory. Trainable tensors (adapters,
heads in modules_to_save) always stay fp32 masters.

The optimizer (``make_optimizer``) is AdamW with PyTorch's fused kernel on CPU and CUDA (one pass over all
tensors instead of a Python loop per tensor: a full fine-tune of MiniLM's 23M parameters steps 4x faster on CPU;
same update to float rounding, 3e-8 after 11 steps), PyTorch's default implementation under FSDP (its sharded
DTensor parameters) and anywhere the fused kernel refuses the parameters.

``training.compile: true`` compiles each decoder block with ``torch.compile`` (opt-in, regional; see
``maybe_compile``); the summary's ``compile`` field says what was compiled (``compiled_blocks``).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorakit import methods
from lorakit.adapters.corda import calibration, collect_covariances
from lorakit.adapters.lora_init import dense_weights, full_precision
from lorakit.config import ConfigError
from lorakit.state import active_adapter, adapter_configs
from lorakit.surgery.inject import inject
from lorakit.surgery.targets import find_targets
from lorakit.train.config import RunConfig
from lorakit.train.data import DataError, RawData, read_records, split_validation
from lorakit.train.precision import Precision, resolve_precision  # noqa: F401 (re-export)
from lorakit.train.tasks import EncodedDataset, encode_records
from lorakit.validation import parse_dtype

CLASSIFIER_HEADS = ("classifier", "score")


def _subset(raw: RawData, n: int | None, seed: int) -> RawData:
    if n is None or n >= len(raw):
        return raw
    order = list(range(len(raw)))
    random.Random(seed).shuffle(order)
    return raw.subset(sorted(order[:n]))


def load_data(cfg: RunConfig, tokenizer: Any) -> tuple[EncodedDataset, EncodedDataset | None, list[Any]]:
    """(train, validation or None, data-check reports) for the config's data section."""
    d, seed = cfg.data, cfg.training.seed
    raw_train = read_records(d.train, d.fields)
    raw_val = read_records(d.validation, d.fields) if d.validation else None
    if raw_val is None and d.val_fraction > 0:
        raw_train, raw_val = split_validation(raw_train, d.val_fraction, seed)
    raw_train = _subset(raw_train, d.max_train_rows, seed)
    train = encode_records(raw_train, tokenizer, d.task, d.max_length, d.format)
    val = None
    reports = []
    if raw_val is not None:
        raw_val = _subset(raw_val, d.max_val_rows, seed + 1)
        fmt = d.format if d.task == "classification" else train.format
        val = encode_records(raw_val, tokenizer, d.task, d.max_length, fmt, train.label_names)
    try:
        from lorakit.train.check import report_from
    except ImportError:  # the data-check module is optional for the loop itself
        report_from = None
    if report_from is not None:
        reports.append(report_from(raw_train, train))
        if val is not None:
            reports.append(report_from(raw_val, val))
    if d.task == "classification" and len(train.label_names or []) < 2:
        raise DataError(f"{d.train}: classification needs at least 2 labels, found {train.label_names}")
    return train, val, reports


def _model_dtype(cfg: RunConfig, precision: Precision, device: torch.device) -> torch.dtype | None:
    name = cfg.model.dtype
    if name == "auto":  # the frozen base in the autocast dtype when that is bf16 (see the module docstring)
        if cfg.training.distributed == "fsdp" and device.type == "cpu":
            return None  # FSDP's own MixedPrecisionPolicy casts; a bf16 base beside fp32 adapters is untested there
        return torch.bfloat16 if precision.name == "bf16" else None
    return parse_dtype("model.dtype", name)


def build_run_model(
    cfg: RunConfig,
    num_labels: int,
    pad_token_id: int,
    precision: Precision,
    device: torch.device,
    build_on: torch.device | None = None,
    calibrate: Callable[[torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """Base model (+ quantization) + adapter, trainable tensors in fp32, gradient checkpointing on request.

    ``device`` is where the run computes (it decides the dtype); ``build_on`` where the model is left
    (default: ``device``; the CPU under FSDP, which moves each block to the device as it shards it).
    ``calibrate(model)`` runs calibration rows through the base, for an init computed from the layers'
    inputs (CorDA; :func:`calibration_run`)."""
    from lorakit.models import build_model

    task = "classification" if cfg.data.task == "classification" else "causal-lm"
    model = build_model(
        cfg.model.name,
        task=task,
        num_labels=num_labels,
        seed=cfg.training.seed,
        dtype=_model_dtype(cfg, precision, device),
    )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # sequence classifiers find the last token by it
    dense: dict[str, torch.Tensor] = {}
    if cfg.quant is not None:
        try:
            from lorakit.quant import quantize
        except ImportError as e:
            raise ConfigError(
                f"the config has a quant section but lorakit.quant is not available ({e})"
            ) from None
        if cfg.adapter is not None and methods.init_entry(cfg.adapter).reads_full_precision:  # LoftQ
            from lorakit.quant import eligible_layers

            dense = dense_weights(eligible_layers(model, cfg.quant))
        quantize(model, cfg.quant)
    acfg = cfg.adapter
    if acfg is None:  # full fine-tuning: every parameter trains
        model.requires_grad_(True)
    else:
        if task == "classification" and not acfg.modules_to_save:
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            heads = [h for h in CLASSIFIER_HEADS if h in names]
            acfg = acfg.replace(modules_to_save=tuple(heads))  # a fresh head must train (PEFT's SEQ_CLS does too)
        covariances = _covariances(model, acfg, calibrate)
        with full_precision(dense), calibration(covariances):
            inject(model, acfg)
        dense.clear()
        covariances.clear()
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.training.gradient_checkpointing:
        if getattr(model, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and DDP
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # frozen embeddings: make checkpointed inputs carry grad
        else:
            print(
                f"note: {type(model).__name__} does not support gradient checkpointing; training without it"
            )
    model = model.to(build_on or device).train()
    if cfg.training.compile:
        maybe_compile(model, device, dynamic=cfg.data.batching != "pack")
    return model


def compiler_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can): dynamo unsupported on this Python / platform, or
    no C++ compiler for inductor's CPU code."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python / platform"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler (g++ / clang++) for CPU code and none is on PATH"
    return None


def maybe_compile(model: torch.nn.Module, device: torch.device, dynamic: bool = True) -> bool:
    """Compile ``model``'s repeated blocks in place (regional compilation): each decoder / encoder block is
    ``nn.Module.compile``d, so the module tree, its parameters and its state dict stay the same objects
    (checkpoints, evaluation and saving are unchanged), and every call of a block -- from ``model(...)`` or
    from the trainer's loss, which runs the model's body and head itself -- runs compiled code. The blocks
    share one code object, so one graph serves them all (compile time is one block's, not the model's).
    ``dynamic``: compile for any sequence length at once (length-grouped batches change shape every step;
    otherwise the second shape would recompile); False for fixed shapes (packed rows). The first block
    compiles a graph of its own (its input, from the frozen embeddings, carries no gradient). Where the
    compiler is unavailable or lorakit knows no blocks for the model, warn and train eagerly. True if compiled."""
    from lorakit.models.families import decoder_blocks

    why = compiler_unavailable(device)
    if why is None:
        try:
            blocks = decoder_blocks(model)
        except (ValueError, KeyError) as e:
            blocks, why = [], f"no repeated blocks to compile ({e})"
        if not blocks and why is None:
            why = f"{type(model).__name__} has no repeated blocks to compile"
    if why is not None:
        warnings.warn(f"training.compile=true: {why}; training without it (eager mode)", stacklevel=2)
        return False
    for block in blocks:
        block.compile(dynamic=dynamic)
    return True


def compiled_blocks(model: torch.nn.Module) -> str:
    """What ``maybe_compile`` compiled, for the run summary: ``"LlamaDecoderLayer x4"``, or ``"off"``."""
    names = [type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    return f"{names[0]} x{len(names)}" if names else "off"


def _covariances(
    model: torch.nn.Module, acfg: Any, calibrate: Callable[[torch.nn.Module], None] | None
) -> dict[str, torch.Tensor]:
    """The target layers' input covariances when the adapter's init reads them (CorDA), else nothing."""
    if not methods.init_entry(acfg).reads_inputs:
        return {}
    if calibrate is None:
        raise ConfigError(f"adapter.init={acfg.init!r} needs calibration rows; build_run_model got no calibrate")
    return collect_covariances(model, find_targets(model, acfg), lambda: calibrate(model))


def calibration_run(
    acfg: Any, examples: Sequence[dict[str, Any]], collate: Callable[[list], dict[str, torch.Tensor]],
    device: torch.device, autocast: Callable[[], Any],
) -> Callable[[torch.nn.Module], None] | None:
    """``calibrate`` for :func:`build_run_model` when the adapter's init reads the layers' inputs (CorDA),
    else None: the first ``method_options.corda_rows`` training examples, one at a time (PEFT's CorDA
    statistics are per row), through the model without gradients, under the run's autocast."""
    if acfg is None or not methods.init_entry(acfg).reads_inputs:
        return None
    rows = int(acfg.option("corda_rows"))

    @torch.no_grad()
    def run(model: torch.nn.Module) -> None:
        where = next(model.parameters()).device  # the CPU while FSDP builds, else the run's device
        for ex in examples[:rows]:
            batch = {k: v.to(where) for k, v in collate([ex]).items() if k != "labels"}
            with autocast() if where.type == device.type else contextlib.nullcontext():
                model(**batch)

    return run


def optimizer_groups(
    model: torch.nn.Module, weight_decay: float, lr: float | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in a fixed order: matrices with weight decay, biases / norms / vectors without.

    When the active adapter's method has optimizer settings that its config turns on (its registry
    entry's ``optimizer``: LoRA+ with ``method_options.loraplus_lr_ratio``, AdaLoRA with
    ``method_options.lambda_lr_ratio``), those groups, with their
    own learning rates from ``lr``, are used instead."""
    name = active_adapter(model)
    cfg = adapter_configs(model).get(name) if name is not None else None
    special = methods.get(cfg.method).optimizer if cfg is not None else None
    if special is not None:
        groups = special(model, cfg, 1.0 if lr is None else lr, weight_decay)
        if groups is not None and lr is None:
            raise ConfigError(f"adapter {name!r} has its own optimizer groups (LoRA+, AdaLoRA's λ rate): pass lr to optimizer_groups")
        if groups is not None:
            return groups
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the adapter config left no trainable parameters (check target_modules)")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, sharded: bool = False
) -> tuple[torch.optim.AdamW, str]:
    """AdamW over ``groups`` (``optimizer_groups``) and which implementation runs it ("fused" or "default").

    Fused where every trainable tensor is a plain floating tensor on CPU or CUDA (``sharded``: FSDP's DTensors
    keep the default). The choice changes float rounding only, never the update rule, so a run resumes
    with the implementation it would pick again."""
    params = [p for g in groups for p in g["params"]]
    fusable = not sharded and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    if fusable:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "fused"
        except (RuntimeError, ValueError):  # a build or device without the kernel: the default, same update
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps), "default"
