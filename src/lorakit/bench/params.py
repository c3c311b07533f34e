"""Parameter efficiency: total vs trainable parameters, per adapted layer and for the model.

For LoRA on a (d x k) weight the adapter holds r(d + k) parameters against d*k for the weight itself
(Hu et al. 2021, section 4). Quantized weights count by their logical element count (d*k), not by
storage bytes; memory is reported separately in bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lorakit.surgery.inject import active_adapter, adapted_layers
from lorakit.weights import weight_access


@dataclass
class LayerRow:
    name: str
    adapter: str
    kind: str
    shape: tuple[int, int]  # (d, k): out x in features of the base weight
    r: int
    adapter_params: int
    share: float  # adapter params / base weight params


@dataclass
class EfficiencyReport:
    total_params: int  # logical parameters of the whole model (base + adapters + trained copies)
    trainable_params: int
    base_params: int  # the model without any adapter
    adapter_params: int  # all adapter tensors (every adapter, active or not)
    memory_bytes: int  # storage of all parameters and buffers
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Trainable share of all parameters."""
        return self.trainable_params / max(self.total_params, 1)

    @property
    def reduction_pct(self) -> float:
        """How many fewer parameters train than in full fine-tuning of the base, in percent."""
        return 100.0 * (1.0 - self.trainable_params / max(self.base_params, 1))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["reduction_pct"] = self.reduction_pct
        return d

    def table(self, max_rows: int = 40) -> str:
        lines = [f"{'layer':<48} {'adapter':<10} {'d x k':>13} {'r':>4} {'params':>10} {'share':>8}"]
        for row in self.layers[:max_rows]:
            dk = f"{row.shape[0]}x{row.shape[1]}"
            lines.append(
                f"{row.name[-48:]:<48} {row.adapter[:10]:<10} {dk:>13} {row.r:>4} {row.adapter_params:>10,} "
                f"{100 * row.share:>7.2f}%"
            )
        if len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        lines += [
            "",
            f"total parameters      {self.total_params:>14,}",
            f"trainable parameters  {self.trainable_params:>14,}",
            f"trainable ratio       {100 * self.ratio:>13.4f}%",
            f"reduction vs full FT  {self.reduction_pct:>13.4f}%",
            f"memory (params+bufs)  {self.memory_bytes / 2**20:>11.2f} MiB",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _logical_numel(module: nn.Module) -> tuple[int, int]:
    """(logical parameter count, trainable count) over a module tree, quantized weights by d*k."""
    total = trainable = 0
    seen: set[int] = set()  # tied weights (e.g. input/output embeddings) count once
    for m in module.modules():
        access = weight_access(m)
        if access is not None and access.quantized:
            total += access.numel()
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _storage_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    size = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        size += t.numel() * t.element_size()
    return size


def efficiency_report(model: nn.Module) -> EfficiencyReport:
    """Count total, trainable and per-layer adapter parameters of ``model``."""
    total, trainable = _logical_numel(model)
    adapter_total = 0
    copies_total = 0
    rows: list[LayerRow] = []
    active = active_adapter(model)
    for name, layer in adapted_layers(model):
        access = layer.access
        base_numel = access.numel()
        for aname, adapter in layer.adapters.items():
            n = sum(p.numel() for p in adapter.parameters())
            adapter_total += n
            rows.append(LayerRow(name, aname, access.kind, (access.out_features, access.in_features),
                                 int(getattr(adapter, "r", 0)), n, n / max(base_numel, 1)))
    for m in model.modules():
        copies = getattr(m, "copies", None)
        if isinstance(copies, nn.ModuleDict) and hasattr(m, "original"):
            copies_total += sum(p.numel() for p in copies.parameters())
    rows.sort(key=lambda row: row.adapter != active)  # active adapter first, model order kept
    return EfficiencyReport(
        total_params=total,
        trainable_params=trainable,
        base_params=total - adapter_total - copies_total,
        adapter_params=adapter_total,
        memory_bytes=_storage_bytes(model),
        layers=rows,
    )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total": ..., "trainable": ...} with quantized weights counted by logical size."""
    total, trainable = _logical_numel(model)
    return {"total": total, "trainable": trainable}


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    ps = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(p.numel() * p.element_size() for p in ps)


__all__ = ["EfficiencyReport", "LayerRow", "count_parameters", "efficiency_report", "parameter_bytes"]
