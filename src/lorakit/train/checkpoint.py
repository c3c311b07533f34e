"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``<output>/checkpoints/step-00000010/`` holding

    trainable.safetensors   adapter tensors (every trainable parameter + the adapters' buffers), by name
    state.safetensors       every other tensor of the run state (optimizer moments, RNG states, ...)
    state.json              the run state's structure and scalars; tensors appear as {"__tensor__": key}

The run state is one nested structure (optimizer and scheduler ``state_dict``s, RNG states of torch /
python ``random`` / numpy / CUDA, data position, callback ``state_dict``s, trainer counters);
``encode``/``decode`` turn it into JSON + named tensors and back exactly (int dict keys, tuples and numpy
arrays survive). Saving is atomic: files are written into a temporary directory, fsynced, and the
directory is renamed into place, so a process killed mid-save (even with SIGKILL) leaves only a stray
``.tmp-*`` directory that the next run removes; every ``step-*`` directory is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorakit.state import adapter_configs
from lorakit.train import tracking

STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """JSON-able form of ``obj``; its tensors go into ``tensors`` under unique keys."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        if isinstance(obj, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
            return {"__ndarray__": key}
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} at {path}")
            items.append([k, encode(v, tensors, f"{path}.{i}")])
        return {"__items__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not allow fsync on a directory
        pass


def write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    _fsync_file(path)


def write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of every trainable parameter and every tensor inside an adapter or a trained copy."""
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n for n in model.state_dict(keep_vars=True) if n in params or ".adapters." in n or ".copies." in n}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter and every tensor inside an adapter or a trained copy, by name (of an
    unsharded model; ``lorakit.train.fsdp.full_trainable_state`` gathers a sharded one)."""
    names = trainable_names(model)
    return {n: t.detach().cpu().clone() for n, t in model.state_dict(keep_vars=True).items() if n in names}


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """target <- value; a sharded (FSDP2 DTensor) target receives its own shard of the full ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        part = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(value)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    missing = sorted(trainable_names(model) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
            " (was it written with another adapter config?)"
        )
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if target.shape != value.shape:
                raise CheckpointError(
                    f"checkpoint tensor {name}: shape {tuple(value.shape)} != {tuple(target.shape)}"
                )
            _copy_into(target, value)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep_last: int = 2,
    trainable: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a checkpoint atomically and keep only the newest ``keep_last``; returns its path.
    ``trainable``: the adapter tensors when already gathered (a sharded model), else read from ``model``."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors_of_model = trainable if trainable is not None else trainable_state(model)
    write_safetensors(tensors_of_model, os.path.join(tmp, "trainable.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    write_safetensors(tensors, os.path.join(tmp, "state.safetensors"))
    write_json(structure, os.path.join(tmp, "state.json"))  # written last: marks the directory complete
    _fsync_dir(tmp)
    old = None
    if os.path.exists(
        final
    ):  # the same step again: swap, so a complete copy exists at every moment but one rename
        old = f"{tmp}-old"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(root)
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(root: str) -> None:
    """Delete temporary directories left by a save that was killed."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(path: str, model: torch.nn.Module) -> dict[str, Any]:
    """Restore the adapter tensors into ``model`` and return the run state written with them."""
    files = [os.path.join(path, f) for f in ("trainable.safetensors", "state.safetensors", "state.json")]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"checkpoint {path!r} is incomplete: {os.path.basename(f)} is missing")
    load_trainable_state(model, load_file(files[0]))
    with open(files[2], encoding="utf-8") as f:
        structure = json.load(f)
    return decode(structure, load_file(files[1]))


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (dropout, shuffling, sampling)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


ARTIFACTS = ("checkpoints", "adapter", "metrics.jsonl", "summary.json", "loss_curve.png", "run_config.json",
             *tracking.ARTIFACTS)


def save_final_adapter(
    model: torch.nn.Module, path: str, base_model: str | None = None, run: dict[str, Any] | None = None
) -> str:
    """Save the trained adapter with ``lorakit.io.save_adapter`` (PEFT layout, model card with ``run``'s data,
    steps and metrics); a model trained in full (no adapter) is saved whole with ``save_pretrained``
    (safetensors), atomically."""
    from lorakit.io import save_adapter
    from lorakit.io.atomic import atomic_directory

    if not adapter_configs(model):
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        return path
    save_adapter(model, path, adapter_name="default", base_model_name_or_path=base_model, run=run)
    return path
