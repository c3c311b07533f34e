"""Where AdaLoRA's rank budget went: a per-matrix table and a heatmap of layers x module types.

    report = rank_report(model)            # after training (or after loading a pruned adapter)
    print(report.table())
    report.heatmap("ranks.png")            # rows: layer index, columns: module type (q_proj, v_proj, ...)

The kept rank of a matrix is the number of its singular values still unmasked (Zhang et al. 2023,
https://arxiv.org/abs/2303.10512, Fig. 1 shows the same view for DeBERTaV3).

It sits with the other reports of a model (``lorakit.bench.params.efficiency_report``), above the
adapters and the file writer it uses. ``lorakit.rank_report`` is the public name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lorakit.adapters.adalora import adalora_layers, resolve_adapter
from lorakit.io.atomic import atomic_write

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class RankRow:
    module: str  # full module path
    layer: int | None  # index of the block the module sits in (None outside numbered blocks)
    kind: str  # path inside the numbered block, e.g. "self_attn.q_proj" (the full path outside blocks)
    init_r: int
    rank: int  # singular values kept


@dataclass(frozen=True)
class RankReport:
    adapter_name: str
    rows: tuple[RankRow, ...]
    schedule: dict[str, Any] | None = None  # total_step, tinit, tfinal, delta_t in steps (None: not resolved)

    @property
    def total(self) -> int:
        return sum(r.rank for r in self.rows)

    def table(self) -> str:
        width = max(len("module"), *(len(r.module) for r in self.rows))
        lines = [
            f"AdaLoRA ranks of adapter {self.adapter_name!r}: {self.total} of "
            f"{sum(r.init_r for r in self.rows)} singular values kept over {len(self.rows)} matrices",
        ]
        if self.schedule:
            lines.append("schedule: " + ", ".join(f"{k} {v}" for k, v in self.schedule.items()))
        lines += [f"{'module':<{width}}  {'init_r':>6}  {'rank':>4}"]
        lines += [f"{r.module:<{width}}  {r.init_r:>6}  {r.rank:>4}" for r in self.rows]
        return "\n".join(lines)

    def grid(self) -> tuple[list[int | None], list[str], list[list[int | None]]]:
        """(layer indices, module types, ranks[layer][type]) with None where a layer lacks that type."""
        layers = sorted({r.layer for r in self.rows}, key=lambda v: -1 if v is None else v)
        kinds = list(dict.fromkeys(r.kind for r in self.rows))
        cells: list[list[int | None]] = [[None] * len(kinds) for _ in layers]
        for r in self.rows:
            i, j = layers.index(r.layer), kinds.index(r.kind)
            cells[i][j] = r.rank if cells[i][j] is None else cells[i][j] + r.rank
        return layers, kinds, cells

    def heatmap(self, path: str, title: str | None = None) -> str:
        """Write a PNG heatmap (layers x module types, kept rank in each cell) atomically; returns path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        layers, kinds, cells = self.grid()
        data = np.array([[np.nan if c is None else c for c in row] for row in cells], dtype=float)
        vmax = max(r.init_r for r in self.rows)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.1 * len(kinds)), 1.4 + 0.45 * len(layers)))
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), ["-" if v is None else str(v) for v in layers])
        ax.set_ylabel("layer")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                if c is not None:
                    ax.text(j, i, str(c), ha="center", va="center", color="w" if c < vmax * 0.6 else "k")
        fig.colorbar(im, ax=ax, label="kept rank")
        ax.set_title(title or f"AdaLoRA kept ranks ({self.total} total)", fontsize=10)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return path

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "total": self.total,
            "schedule": self.schedule,
            "rows": [asdict(r) for r in self.rows],
        }


def rank_report(model: nn.Module, adapter_name: str | None = None) -> RankReport:
    """The kept rank of every AdaLoRA matrix of the model's active (or named) adapter."""
    name, cfg = resolve_adapter(model, adapter_name)
    steps = (cfg.total_step, cfg.tinit, cfg.tfinal, cfg.delta_t)
    schedule = None  # the steps it ran with: the controller writes them in the config once T is known
    if cfg.total_step is not None and all(type(v) is int for v in steps):
        schedule = dict(zip(("total_step", "tinit", "tfinal", "delta_t"), steps))
    rows = []
    for path, a in adalora_layers(model, name).items():
        m = _LAYER_RE.search(f".{path}.")  # kind: the path inside the numbered block (attention.self.query)
        kind = f"{path}."[m.end() - 1 :].rstrip(".") if m else path
        rows.append(RankRow(path, int(m.group(1)) if m else None, kind, a.init_r, a.r))
    return RankReport(name, tuple(rows), schedule)
