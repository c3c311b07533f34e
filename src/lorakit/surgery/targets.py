"""Target selection: which modules an adapter config adapts. A pure function over module names
and kinds (STYLE.md rule 8), plus a model-level wrapper and a dry-run report.

Matching rules (PEFT's):
- a list matches a module whose name equals an entry or ends with ``"." + entry``;
- a string is a regex that must match the whole module name;
- ``"all-linear"`` matches every linear-like module (nn.Linear, GPT-2 Conv1D, quantized linears)
  except the output head;
- ``None`` picks the model's attention query and value projections by their usual names.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lorakit import methods
from lorakit.config import AdapterConfig
from lorakit.models.families import TASK_HEADS

# Default targets: the first family whose names occur in the model wins (query and value projections).
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, ...
    ("query", "value"),  # BERT, RoBERTa, MiniLM
    ("c_attn",),  # GPT-2 (fused qkv Conv1D)
    ("query_key_value",),  # GPT-NeoX, Falcon, Bloom
    ("q", "v"),  # T5
)
# Top-level module names of output heads: never adapted by "all-linear".
HEAD_NAMES = TASK_HEADS
LAYER_CONTAINERS = ("layers", "h", "layer", "blocks", "block")


class TargetError(ValueError):
    """No module matched, or a matched module cannot be adapted."""


@dataclass(frozen=True)
class ModuleInfo:
    """What target matching needs to know of one module."""

    name: str
    kind: str | None  # "linear" | "embedding" | "conv" | None (not adaptable)
    type_name: str


def _matches(spec: str | tuple[str, ...], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: str | None = None) -> int | None:
    """The transformer block index in a module name (``model.layers.3.mlp`` -> 3), or None."""
    containers = (layers_pattern,) if layers_pattern else LAYER_CONTAINERS
    alternatives = "|".join(re.escape(c) for c in containers)
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def is_head(name: str, head_names: Iterable[str] = ()) -> bool:
    """The model's output head: its output embeddings, or a top-level module named like a head."""
    return name in set(head_names) or name.split(".", 1)[0] in HEAD_NAMES


def match_targets(
    modules: Sequence[ModuleInfo], cfg: AdapterConfig, head_names: Iterable[str] = (), strict: bool = True
) -> list[str]:
    """Names of the modules ``cfg`` adapts, in model order. Raises TargetError if none match or a
    matched module has an unsupported type.

    Each entry of a target list must match some module: a typo (``qproj``) next to a good entry would
    otherwise adapt less than asked without a word. ``strict=False`` (reading an adapter file, which
    PEFT accepts with such entries) turns that into a warning. A matched module of a layer kind the
    method does not adapt (its registry entry's ``kinds``) is an error naming it."""
    spec = cfg.target_modules
    heads = tuple(head_names)
    method = methods.get(cfg.method)
    if isinstance(spec, (list, tuple)):
        _check_entries(spec, modules, strict)
    if spec is None:
        leaves = {m.name.rsplit(".", 1)[-1] for m in modules if m.kind is not None}
        for family in DEFAULT_TARGETS:
            if any(f in leaves for f in family):
                spec = family
                break
        else:
            raise TargetError(
                "target_modules=None: no usual query/value projection names found; "
                f"give target_modules explicitly. {_adaptable_summary(modules)}"
            )
    chosen: list[str] = []
    filtered: list[str] = []  # matched by name, then left out by exclude_modules / modules_to_save / layers
    for m in modules:
        if not m.name:
            continue
        if spec == "all-linear":
            hit = m.kind == "linear" and not is_head(m.name, heads)
        else:
            hit = _matches(spec, m.name)
        if not hit:
            continue
        filtered.append(m.name)
        if cfg.exclude_modules is not None and _matches(cfg.exclude_modules, m.name):
            continue
        if any(m.name == s or m.name.endswith("." + s) for s in cfg.modules_to_save):
            continue
        if cfg.layers_to_transform is not None:
            idx = layer_index(m.name, cfg.layers_pattern)
            if idx is None or idx not in cfg.layers_to_transform:
                continue
        if m.kind is None:
            raise TargetError(
                f"target {m.name!r} is a {m.type_name}, which lorakit cannot adapt; supported: Linear, "
                "Embedding, Conv1d, Conv2d, GPT-2 Conv1D and quantized linears"
            )
        if m.kind not in method.kinds:
            raise TargetError(method.kind_error(m.name, m.kind, m.type_name))
        chosen.append(m.name)
    if not chosen:
        shown = spec if isinstance(spec, str) else list(spec)
        if filtered:
            raise TargetError(
                f"target_modules={shown!r} matched {len(filtered)} module(s) (e.g. {filtered[0]!r}), but "
                f"exclude_modules={_shown(cfg.exclude_modules)}, modules_to_save={list(cfg.modules_to_save)} and "
                f"layers_to_transform={_shown(cfg.layers_to_transform)} left none of them"
            )
        raise TargetError(f"target_modules={shown!r} matched no module. {_adaptable_summary(modules)}")
    return chosen


def _shown(v: object) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


def _check_entries(spec: Sequence[str], modules: Sequence[ModuleInfo], strict: bool) -> None:
    names = [m.name for m in modules if m.name]
    missing = [t for t in spec if not any(_matches((t,), n) for n in names)]
    if not missing:
        return
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in modules if m.kind is not None and m.name})
    hints = []
    for t in missing:
        near = difflib.get_close_matches(t, leaves, n=1)
        hints.append(f"{t!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    message = f"target_modules entries matched no module: {', '.join(hints)}. {_adaptable_summary(modules)}"
    if strict:
        raise TargetError(message)
    warnings.warn(message, stacklevel=3)


def _adaptable_summary(modules: Sequence[ModuleInfo], limit: int = 12) -> str:
    leaves: dict[str, str] = {}
    for m in modules:
        if m.kind is not None and m.name:
            leaves.setdefault(m.name.rsplit(".", 1)[-1], m.name)
    if not leaves:
        return "The model has no adaptable module."
    names = list(leaves)
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    example = next(iter(leaves.values()))
    return f"Adaptable module names: {', '.join(names[:limit])}{more} (e.g. {example!r})"


def describe_modules(model: nn.Module) -> list[ModuleInfo]:
    """ModuleInfo for every module; lorakit's own wrappers count as the module they wrap."""
    from lorakit.surgery.layer import AdaptedLayer, TrainedCopy
    from lorakit.weights import weight_access

    infos: list[ModuleInfo] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (AdaptedLayer, TrainedCopy)):
            skip.append(name)
            inner = module.base if isinstance(module, AdaptedLayer) else module.original
            access = weight_access(inner)
            infos.append(ModuleInfo(name, access.kind if access else None, type(inner).__name__))
            continue
        access = weight_access(module)
        infos.append(ModuleInfo(name, access.kind if access else None, type(module).__name__))
    return infos


def head_names(model: nn.Module) -> list[str]:
    """Names of the model's output head (its output embeddings), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return []
    return [name for name, m in model.named_modules() if m is head]


def find_targets(model: nn.Module, cfg: AdapterConfig, strict: bool = True) -> list[str]:
    """Dry run: the names of the modules ``inject(model, cfg)`` would adapt (nothing is changed).
    ``strict``: a target list entry that matches nothing raises (True) or warns (False)."""
    return match_targets(describe_modules(model), cfg, head_names(model), strict)
