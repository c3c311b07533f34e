"""The training loss as a module, so it runs inside the forward that DDP (or FSDP) wraps.

Causal LM (SFT): the summed next-token cross-entropy  sum_t -log p(y_{t+1} | y_<=t)  over positions
whose label is not -100 (logits at t predict label t+1, the Hugging Face shift). Computed without ever
materialising full-vocabulary logits for the batch:

1. the model's *body* (``model.get_decoder()``) gives hidden states h: (B, L, H);
2. only the rows whose next label is kept are gathered: h_kept (N, H), N = number of targets -- no LM-head
   work on prompt tokens (completion-only loss) or padding;
3. the head (``model.get_output_embeddings()``) and the fp32 cross-entropy run over at most
   ``chunk_rows`` rows at a time. A frozen plain linear head (every adapter method but full fine-tuning,
   unless the head itself is adapted) takes ``FrozenHeadCrossEntropy``: each chunk's fp32 logits give its
   loss and then its gradient softmax - onehot, turned into the rows' gradient in forward; autograd keeps
   (N, H) and nothing is recomputed. Any other head (an adapter wrapping it, a trainable head) is called
   as a module: each chunk but the last is a non-reentrant ``torch.utils.checkpoint`` region, so what
   autograd keeps per chunk is its (chunk, H) hidden rows, and the chunk's (chunk, V) logits are
   recomputed in backward, one chunk alive at a time (the last chunk's are kept: backward starts there,
   so keeping them costs no extra peak).

The result equals ``forward_loss`` (the full-logits reference, kept below) up to the order of the fp32
sum. It is only used when logits are *proved* to be plain ``head(body(x))``: configs with a known logit
transform (soft-capping, logit scaling) or hooks on the model's own forward take the full-logits path,
and otherwise a short probe (8 tokens, eval mode, no grad, no global RNG used) compares
``model(x).logits`` with ``head(body(x))`` on the actual model once; any difference -> full path.
``TaskLoss.path`` / ``.why`` say which was chosen.

Classification: summed cross-entropy over rows on the model's logits (unchanged).

Losses are *sums* with their target counts so the trainer can normalise by the number of targets in the
whole global batch (the gradient then does not depend on how the batch is split).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 24  # logits per chunk by default (16 M: 64 MB in fp32), whatever the vocabulary
# a frozen head's chunk is turned into its loss and gradient in row blocks of about BLOCK_LOGITS logits (4 M:
# 16 MB in fp32, so a block's fp32 log-softmax stays in a CPU's last-level cache and under the 16 MiB mmap
# threshold that ``training.return_freed_memory`` sets); the chunk's matmuls stay large
BLOCK_LOGITS = 4_000_000
PROBE_TOKENS = 8
# config fields (of the config or its text_config) under which transformers changes logits after the head
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def default_chunk_rows(vocab: int) -> int:
    """Rows per cross-entropy chunk for a vocabulary of ``vocab`` (the planner mirrors this rule)."""
    return max(16, CHUNK_LOGITS // max(vocab, 1))


def block_rows(vocab: int) -> int:
    """Rows per block of a frozen head's in-forward gradient (the planner mirrors this rule)."""
    return max(1, BLOCK_LOGITS // max(vocab, 1))


def forward_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, logits) for one collated batch on the model's device, from the full logits.

    The reference path: every position's full-vocabulary logits, cast to fp32."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "sft":
        inputs["use_cache"] = False
    logits = model(**inputs).logits
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), logits
    shifted = logits[:, :-1].float()
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, logits


def _chunk_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk: rows (C, H), targets (C,) -> scalar."""
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def chunked_cross_entropy(
    head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """sum_i -log softmax(head(rows_i))[targets_i], in chunks of at most ``chunk_rows`` rows of equal size.

    With grad enabled every chunk but the last is recomputed in backward (only its hidden rows are saved).
    The last keeps its logits: backward starts with it, while every activation of the body is still held,
    which is where a recomputed chunk would sit too -- so the peak is the same and one chunk's head work
    is saved (all of it when the targets fit one chunk). Zero rows still call the head once (on an empty
    chunk), so every head parameter stays in the graph (DDP)."""
    n = rows.shape[0]
    chunks = max(1, -(-n // chunk_rows))  # sizes differ by at most one: no small remainder at the end
    parts = list(zip(rows.tensor_split(chunks), targets.tensor_split(chunks)))
    total = None
    for i, (r, t) in enumerate(parts):
        if torch.is_grad_enabled() and i < len(parts) - 1:
            part = checkpoint(_chunk_loss, head, r, t, use_reentrant=False)
        else:
            part = _chunk_loss(head, r, t)
        total = part if total is None else total + part
    assert total is not None  # tensor_split always yields at least one (possibly empty) chunk
    return total


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(rows_i W^T + b)[targets_i] for a frozen linear head, with the gradient w.r.t. the
    rows computed in forward, chunk by chunk: for a chunk of logits z, d loss / d z = softmax(z) - onehot(t).
    The chunk's logits are turned, in row blocks of ``block_rows(vocab)`` (cache-sized), into their fp32
    log-softmax (one fused pass), which gives the loss (-log p_t) and then, exponentiated in place, that
    gradient, written back over the block's logits in their dtype; the head's matrix turns the chunk's
    gradient into the rows' gradient (chunk, H) in one matmul. Nothing vocabulary-sized outlives its chunk
    and nothing is recomputed in backward, which only scales the stored gradient by the incoming one. The
    matmuls run in the ambient autocast dtype, as ``head(rows)`` would; the gradient goes into the second
    matmul in the logits' dtype, as autograd's would."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_rows):  # rows (N, H), targets (N,)
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grads = []
        chunks = max(1, -(-rows.shape[0] // chunk_rows))
        step = block_rows(weight.shape[0])
        for r, t in zip(rows.tensor_split(chunks), targets.tensor_split(chunks)):
            logits = F.linear(r, weight, bias)  # (C, V): a new tensor, overwritten below by its gradient
            for lo in range(0, logits.shape[0], step):
                block, tb = logits[lo:lo + step], t[lo:lo + step]
                logp = torch.log_softmax(block, dim=-1, dtype=torch.float32)  # a new fp32 tensor
                total -= logp.gather(1, tb.unsqueeze(1)).sum()
                if need_grad:
                    logp.exp_()  # softmax, in place
                    logp[torch.arange(tb.shape[0], device=tb.device), tb] -= 1.0
                    block.copy_(logp)
                del logp  # before the next block's (or chunk's) is allocated
            if need_grad:
                grads.append((logits @ weight.to(logits.dtype)).to(rows.dtype))
            del logits
        ctx.save_for_backward(torch.cat(grads) if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_total, None, None, None, None


def fusable_head(head: nn.Module) -> bool:
    """A plain ``nn.Linear`` with no trainable parameter and no hooks: its gradient can be taken in forward."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or head._backward_hooks:
        return False
    return not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)


def last_hidden(out: Any) -> torch.Tensor:
    """The body's last hidden states, whether it returns a ModelOutput or a tuple."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _known_transform(config: Any) -> str | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for name in LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None and not isinstance(value, bool):
                return f"config.{name}={value!r} changes logits after the head"
    return None


def _probe(model: nn.Module, body: nn.Module, head: nn.Module) -> str | None:
    """None when model(x).logits == head(body(x)) on a short fixed input; else why not."""
    device = next(iter(head.parameters()), next(model.parameters())).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 2
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "use_cache": False,
    }
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # eager: a compiled block would otherwise compile an eval graph for one 8-token probe
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            full = model(**inputs).logits
            hidden = last_hidden(body(**inputs))
            mine = head(hidden)
    except Exception as e:  # a body that does not take these inputs: not provably plain
        return f"the probe failed ({type(e).__name__}: {e})"
    finally:
        for m, was in modes.items():
            m.training = was
    if mine.shape != full.shape:
        return f"head(body(x)) has shape {tuple(mine.shape)}, the model's logits {tuple(full.shape)}"
    diff = float((mine.float() - full.float()).abs().max())
    scale = float(full.float().abs().max())
    if not diff <= 1e-6 * max(scale, 1.0):
        return f"head(body(x)) differs from the model's logits by {diff:.3g} (max |logit| {scale:.3g})"
    return None


def _fsdp_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _foreign_hooks(model: nn.Module) -> list[Any]:
    """Hooks on the model's own forward other than lorakit's row routing (a no-op without
    ``adapter_names``, which training batches never carry)."""
    from lorakit.surgery.rows import is_routing_hook

    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    return [h for h in hooks if not is_routing_hook(h)]


def split_lm(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, str]:
    """(body, head, why) when the causal LM's logits are proved to be head(body(x)); (None, None, why) if not."""
    config = getattr(model, "config", None)
    get_body = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if config is None or get_body is None or get_head is None:
        return None, None, f"{type(model).__name__} has no get_decoder / get_output_embeddings"
    why = _known_transform(config)
    if why:
        return None, None, why
    if _fsdp_sharded(model):
        return None, None, "an FSDP-sharded root gathers the head's parameters only inside its own forward"
    if _foreign_hooks(model):
        return None, None, f"{type(model).__name__} has hooks on its own forward, which the split would skip"
    try:
        body, head = get_body(), get_head()
    except Exception as e:  # transformers raises for models it has no rule for
        return None, None, f"no body/head split ({type(e).__name__}: {e})"
    if body is None or head is None or body is model:
        return None, None, f"{type(model).__name__}: no separate body and output head"
    why = _probe(model, body, head)
    if why:
        return None, None, why
    return body, head, "logits are head(body(x)) (probed on this model)"


class TaskLoss(nn.Module):
    """``forward(batch) -> (summed loss, aux)``: aux is the logits (classification) or the target count (SFT).

    Wraps ``model`` (a registered submodule: same parameters, ``train()``/``eval()`` reach it). For SFT
    ``path`` is "chunked" (head only on kept rows, chunked fp32 cross-entropy) or "full" (the reference
    ``forward_loss``, for models whose logits are not provably head(body(x))); ``why`` says why.
    ``chunk_rows``: rows per cross-entropy chunk (default: ``default_chunk_rows(vocab)``).
    """

    def __init__(self, model: nn.Module, task: str, chunk_rows: int | None = None):
        super().__init__()
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows}")
        self.model, self.task = model, task
        self._body: nn.Module | None = None
        self._head: nn.Module | None = None
        self.path, self.why = "full", "classification uses the model's logits"
        if task == "sft":
            body, head, self.why = split_lm(model)
            if body is not None:
                # plain attributes, not submodules: the parameters are registered once, under self.model
                object.__setattr__(self, "_body", body)
                object.__setattr__(self, "_head", head)
                self.path = "chunked"
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
        self.chunk_rows = chunk_rows or default_chunk_rows(vocab)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if self.task == "classification":
            return forward_loss(self.model, batch, self.task)
        keep = labels[:, 1:] != IGNORE_INDEX  # (B, L-1): position t predicts label t+1
        if self._body is None:
            loss, _ = forward_loss(self.model, batch, self.task)
            return loss, keep.sum()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = last_hidden(self._body(**inputs, use_cache=False))  # (B, L, H)
        rows = hidden[:, :-1][keep]  # (N, H): only positions whose next token is a target
        targets = labels[:, 1:][keep]  # (N,)
        head = self._head
        if fusable_head(head):  # checked per call: an adapter or modules_to_save may wrap the head later
            loss = FrozenHeadCrossEntropy.apply(rows, head.weight, head.bias, targets, self.chunk_rows)
            return loss, keep.sum()
        return chunked_cross_entropy(head, rows, targets, self.chunk_rows), keep.sum()
