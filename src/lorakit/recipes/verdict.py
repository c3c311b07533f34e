"""Whether a `lorakit compare` row learned anything, so a collapse is never ranked as a result.

A row *learned* when its training loss fell (last logged loss below 0.98x the first) and its task metric
beat the no-skill baseline: for classification the majority-class share of the evaluation labels (what
predicting one class scores; 0.5367 on SST-2 dev) by more than ``MARGIN``; for SFT a held-out perplexity
below 0.98x the untrained model's. Otherwise the row is *not learned*, with the likely cause: too few
optimizer steps (under ``FEW_STEPS``) or a learning rate that does not suit the method (full fine-tuning
wants about 10x lower than LoRA; REFERENCE.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

MARGIN = 0.01  # accuracy points above the majority baseline that count as learning
FEW_STEPS = 50


def majority_share(labels: Sequence[Any]) -> float | None:
    """The share of the most frequent label (what always predicting it scores), None without labels."""
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def verdict(row: Mapping[str, Any]) -> tuple[bool, str]:
    """(learned, why) for a compare row with ``metric_name``, ``metric``, ``metric_before``, ``baseline``,
    ``loss_first``, ``loss_last``, ``steps`` and ``lr``."""
    reasons = []
    first, last = row.get("loss_first"), row.get("loss_last")
    if first is None or last is None or not last < 0.98 * first:
        reasons.append(f"the loss did not fall ({_num(first)} -> {_num(last)})")
    metric, base = row.get("metric"), row.get("baseline")
    if row.get("metric_name") == "accuracy":
        if metric is None or base is None or metric <= base + MARGIN:
            reasons.append(f"accuracy {_num(metric)} is not above the majority-class baseline {_num(base)}")
    else:
        before = row.get("metric_before")
        if metric is None or before is None or not metric < 0.98 * before:
            reasons.append(f"perplexity {_num(metric)} did not fall below the untrained model's {_num(before)}")
    if not reasons:
        return True, "learned"
    steps, lr = row.get("steps") or 0, row.get("lr")
    cause = f"too few steps ({steps})" if steps < FEW_STEPS else f"lr {lr} may not suit {row.get('method')}"
    return False, f"not learned: {'; '.join(reasons)}; likely cause: {cause}"
