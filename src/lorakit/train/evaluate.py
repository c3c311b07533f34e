"""Loss and evaluation for the two tasks.

Causal LM (SFT): the summed next-token cross-entropy  sum_t -log p(y_{t+1} | y_<=t)  over positions whose
label is not -100 (logits at t predict label t+1, the Hugging Face shift), computed by
``lorakit.train.loss.TaskLoss`` (no logits for ignored positions, chunked); eval reports the mean per
target token and perplexity = exp(mean loss).
Classification: summed cross-entropy over rows; eval reports accuracy and macro-F1 (the unweighted mean
over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), from the confusion matrix summed over ranks).

Losses are returned as *sums* with their target counts so the trainer can normalise by the number of
targets in the whole global batch: then the gradient does not depend on how the batch is split into
micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from lorakit.train.distributed import Dist, all_sum, all_sum_tensor
from lorakit.train.loss import IGNORE_INDEX, TaskLoss, forward_loss

__all__ = ["IGNORE_INDEX", "evaluate", "forward_loss", "macro_f1", "n_targets"]


def n_targets(example: dict[str, Any], task: str) -> int:
    """Targets an example contributes to the loss (its labels after the one-position shift)."""
    if task == "classification":
        return 1
    return sum(1 for lab in example["labels"][1:] if lab != IGNORE_INDEX)


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over classes present in the labels or predictions; rows = true class, cols = predicted."""
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    denom = 2 * tp + fp + fn
    present = denom > 0
    if not present.any():
        return 0.0
    return float((2 * tp[present] / denom[present]).mean())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module | TaskLoss,
    dataset: Any,
    collate: Callable[[list], dict[str, torch.Tensor]],
    task: str,
    batch_size: int,
    d: Dist,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    num_labels: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    """Metrics over the whole validation set; rank r evaluates rows r, r + world, ... and sums are reduced.
    ``model``: the model, or the ``TaskLoss`` the trainer already built around it (its loss path).
    ``lockstep`` (a sharded model, whose forward is collective): every rank runs as many batches as rank 0,
    a rank out of rows forwarding row 0 and discarding it."""
    loss_fn = model if isinstance(model, TaskLoss) else TaskLoss(model, task)
    was_training = loss_fn.training
    loss_fn.eval()
    rows = list(range(d.rank, len(dataset), d.world_size))
    loss_sum = 0.0
    count = 0
    confusion = torch.zeros(max(num_labels, 1), max(num_labels, 1), dtype=torch.long)
    most = -(-len(dataset) // d.world_size) if lockstep else len(rows)  # rank 0 holds the most rows
    for s in range(0, most, batch_size):
        chunk = rows[s : s + batch_size]
        examples = [dataset[i] for i in chunk or [0]]
        batch = {k: v.to(d.device) for k, v in collate(examples).items()}
        with autocast():
            loss, aux = loss_fn(batch)  # aux: logits (classification) or the target count (SFT)
        if not chunk:
            continue
        loss_sum += float(loss)
        if task == "classification":
            count += len(examples)
            pred = aux.argmax(-1).cpu()
            confusion.index_put_((batch["labels"].cpu(), pred), torch.ones_like(pred), accumulate=True)
        else:
            count += int(aux)
    loss_fn.train(was_training)
    loss_sum, count = all_sum([loss_sum, float(count)], d)
    mean = loss_sum / max(count, 1.0)
    if task == "classification":
        confusion = all_sum_tensor(confusion, d)
        return {
            "eval_loss": mean,
            "eval_accuracy": float(confusion.diag().sum()) / max(count, 1.0),
            "eval_macro_f1": macro_f1(confusion),
        }
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}
