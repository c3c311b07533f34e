"""The generation engine behind the server: a background thread that batches concurrent requests.

The loop takes the first waiting request, gathers more for ``batch_wait_s`` (up to ``max_batch_size``
rows and ``max_loaded`` distinct adapters), loads the adapters the batch needs, and decodes the batch
together as one mixed-adapter batch (``lorakit.serving.mixed``) with a KV cache: one prefill over the
left-padded prompts, then one token per live row per step; rows that finish leave the batch (their
cache rows are dropped). Tokens are handed to each request's ``emit`` callback as they are produced,
which is what streaming reads, and a row's ``done`` goes out as soon as that row finishes. Metrics live
in ``lorakit.serving.metrics``.

One request never fails another: ``submit`` refuses a request that cannot run (no tokens, ids outside
the vocabulary, ``max_tokens`` < 1) with a ``ValueError`` before it is queued, ``run_batch`` checks again
(and fails only that request), and an error while handling one row's tokens fails that row alone.
``GenRequest.cancel()`` (a client that went away) drops the request: skipped if still queued, removed
from its batch at the next decode step otherwise, while the other rows go on.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.models.tokenizer import pad_id as tokenizer_pad_id
from lorakit.serving.metrics import Metrics
from lorakit.serving.mixed import BASE, adapter_rows, left_pad
from lorakit.serving.registry import AdapterRegistry

Event = tuple[str, Any]  # ("delta", text) | ("done", {"finish_reason", "usage"}) | ("error", message)


@dataclass
class GenRequest:
    """One completion: prompt token ids, the adapter (or ``BASE``), and sampling limits."""

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    model_name: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from the server's thread; read by the engine at each step

    def cancel(self) -> None:
        """Stop generating for this request (its client went away or no longer needs it)."""
        self.cancelled = True

    def feed(self, token: int, tokenizer: Any, eos_ids: set[int]) -> bool:
        """Take the next token; emit the new text; return True when the request is finished."""
        if token in eos_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        full = tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            cut = full.find(s)
            if cut >= 0:
                full, self.finish_reason = full[:cut], "stop"
        if self.finish_reason is None:
            hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting
            full = full[: len(full) - hold] if hold else full
            if full.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next byte
                full = full[:-1]
        if len(full) > len(self.text) and full.startswith(self.text):
            self.emit(("delta", full[len(self.text) :]))
            self.text = full
        if self.finish_reason is not None:
            self.text = full  # the final text, even if a tokenizer re-spelled an earlier prefix
        return self.finish_reason is not None


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next token per row: greedy where temperature is 0, else nucleus sampling (Holtzman et al. 2019,
    https://arxiv.org/abs/1904.09751). logits (b, V), temperature/top_p (b,) -> (b,)."""
    greedy = logits.argmax(-1)
    if bool((temperature == 0).all()):
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]] = 0  # keep the smallest set reaching top_p
    drawn = order.gather(1, torch.multinomial(sorted_p, 1)).squeeze(1)
    return torch.where(temperature == 0, greedy, drawn)


class Engine:
    """Batches requests from many threads into mixed-adapter generation on one model.

    Args:
        model: a Hugging Face causal LM (adapters are loaded into it by ``registry``).
        tokenizer: its tokenizer (``lorakit.models.tokenizer.load_tokenizer``).
        registry: the servable adapters.
        max_batch_size: most rows decoded together. batch_wait_s: how long to gather a batch.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        registry: AdapterRegistry,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        metrics: Metrics | None = None,
    ) -> None:
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.metrics = metrics or Metrics()
        self.pad_id = tokenizer_pad_id(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self.eos_ids = {
            int(e) for e in ([eos] + (cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])) if e is not None
        }
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size: int | None = getattr(emb, "num_embeddings", None)
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._deferred: list[GenRequest] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._count_lock = threading.Lock()
        self._waiting = 0  # submitted, not yet taken into a batch (cancelled ones until skipped)
        self.running = 0  # rows in the batch being decoded
        self.cancelled = 0  # requests dropped because they were cancelled

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def check(self, request: GenRequest) -> None:
        """Raise ``ValueError`` naming what is wrong if ``request`` cannot be decoded."""
        ids = request.prompt_ids
        if not ids:
            raise ValueError(
                "the prompt has no tokens (this tokenizer may add no BOS): nothing to generate from"
            )
        if any(type(t) is not int for t in ids):
            raise ValueError(f"prompt ids must be ints, got {[t for t in ids if type(t) is not int][:1]}")
        if min(ids) < 0 or (self.vocab_size is not None and max(ids) >= self.vocab_size):
            raise ValueError(
                f"prompt token id {min(ids) if min(ids) < 0 else max(ids)} is outside the vocabulary "
                f"(0..{(self.vocab_size or 0) - 1})"
            )
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens}: expected at least 1")

    def submit(self, request: GenRequest) -> None:
        """Queue ``request`` (``ValueError`` if it cannot run; see ``check``)."""
        self.check(request)
        with self._count_lock:
            self._waiting += 1
        self._queue.put(request)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet decoding (what the server's queue bound counts)."""
        return self._waiting

    def stats(self) -> dict[str, int]:
        return {"waiting": self._waiting, "running": self.running, "cancelled": self.cancelled}

    def _taken(self, req: GenRequest) -> bool:
        """Count ``req`` as out of the queue; False (and counted as cancelled) if it was cancelled."""
        with self._count_lock:
            self._waiting -= 1
            if req.cancelled:
                self.cancelled += 1
        if req.cancelled:
            req.finish_reason = "cancelled"
        return not req.cancelled

    # ------------------------------------------------------------------ batching loop
    def _take_batch(self) -> list[GenRequest]:
        first = self._deferred.pop(0) if self._deferred else self._queue.get()
        if first is None:
            return []
        if not self._taken(first):
            return []
        batch, adapters = [first], {first.adapter} - {BASE}
        cap = self.registry.max_loaded
        deadline = time.perf_counter() + self.batch_wait_s
        pending = self._deferred
        self._deferred = []
        while len(batch) < self.max_batch_size:
            if pending:
                req = pending.pop(0)
            else:
                try:
                    req = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
            if req is None:
                self._stopping = True
                break
            if (
                cap is not None
                and req.adapter != BASE
                and req.adapter not in adapters
                and len(adapters) >= cap
            ):
                self._deferred.append(req)  # would need more adapters in memory than allowed: next batch
                continue
            if not self._taken(req):
                continue
            batch.append(req)
            adapters.add(req.adapter)
        self._deferred = pending + self._deferred
        return batch

    def _loop(self) -> None:
        while not self._stopping:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as e:  # keep serving: report to this batch's unfinished requests only
                for req in batch:
                    if req.finish_reason is None:
                        self._fail(req, f"{type(e).__name__}: {e}")
            finally:
                self.running = 0

    def _fail(self, req: GenRequest, message: str) -> None:
        req.finish_reason = "error"
        req.emit(("error", message))
        self.metrics.record_error(500)

    def _finish(self, req: GenRequest) -> None:
        """Record a finished request and hand its result to its client."""
        usage = {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt_ids) + len(req.tokens),
        }
        self.metrics.record_request(
            req.model_name or req.adapter,
            time.perf_counter() - req.created,
            len(req.prompt_ids),
            len(req.tokens),
        )
        req.emit(("done", {"finish_reason": req.finish_reason, "usage": usage, "text": req.text}))

    def run_batch(self, batch: list[GenRequest]) -> None:
        """Load the adapters ``batch`` needs, decode it as one mixed batch, and finish every request."""
        with self.registry.lock:
            ok: list[GenRequest] = []
            loaded: list[str] = []
            for req in batch:  # a request that cannot run fails alone, not the batch
                if req.cancelled:
                    req.finish_reason = "cancelled"
                    with self._count_lock:
                        self.cancelled += 1
                    continue
                try:
                    self.check(req)
                except ValueError as e:
                    self._fail(req, str(e))
                    continue
                try:  # a broken adapter directory fails its own requests
                    self.registry.ensure(loaded + [req.adapter])
                except (ValueError, OSError, RuntimeError) as e:
                    self._fail(req, f"adapter {req.adapter!r} cannot be loaded: {e}")
                    continue
                loaded.append(req.adapter)
                ok.append(req)
            if ok:
                start = time.perf_counter()
                self._decode(ok)
                self.metrics.record_batch([r.adapter for r in ok], time.perf_counter() - start)

    def _step(self, req: GenRequest, token: int) -> bool:
        """Give ``req`` its next token; True while it goes on (finished, failed or cancelled: False)."""
        if req.cancelled:
            req.finish_reason = "cancelled"
            with self._count_lock:
                self.cancelled += 1
            return False
        try:
            finished = req.feed(token, self.tokenizer, self.eos_ids)
        except Exception as e:  # this row's text handling failed: fail it alone
            self._fail(req, f"{type(e).__name__}: {e}")
            return False
        if finished:
            self._finish(req)
        return not finished

    @torch.inference_mode()
    def _decode(self, batch: list[GenRequest]) -> None:
        ids, mask = left_pad([r.prompt_ids for r in batch], self.pad_id, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        temps = torch.tensor([r.temperature for r in batch], dtype=torch.float32, device=self.device)
        top_ps = torch.tensor([r.top_p for r in batch], dtype=torch.float32, device=self.device)
        live = list(range(len(batch)))
        extra = {"logits_to_keep": 1} if self._keep_kw else {}
        with adapter_rows(self.model, [r.adapter for r in batch]) as plan:
            self.running = len(live)
            out = self.model(ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
            while True:
                cache = out.get("cache", None) or out.get("past_key_values", None)
                tokens = sample(out.logits[:, -1], temps, top_ps).tolist()
                keep = [j for j, i in enumerate(live) if self._step(batch[i], tokens[j])]
                self.running = len(keep)
                if not keep:
                    return
                if len(keep) < len(live):  # finished rows leave the batch and its KV cache
                    sel = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(sel)
                    mask, pos, temps, top_ps = mask[sel], pos[sel], temps[sel], top_ps[sel]
                    live = [live[j] for j in keep]
                    plan.select(keep)
                next_ids = torch.tensor([[tokens[j]] for j in keep], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                pos = pos[:, -1:] + 1
                out = self.model(
                    next_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw: cache}
                )
