"""Server metrics: request and token counts, per-adapter counts, batches, latency percentiles.

tokens/s is completion tokens divided by the time the engine spent decoding batches (``busy_s``);
``uptime_tokens_per_s`` divides by the server's uptime instead. Latency is from when a request reached
the engine to its last token; percentiles are nearest-rank over the last ``window`` requests.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Metrics:
    """Thread-safe counters read by ``/metrics``."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.by_model: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.batches = 0
        self.mixed_batches = 0  # batches whose rows used more than one adapter (the base counts as one)
        self.batch_rows = 0
        self.max_batch_rows = 0
        self.busy_s = 0.0
        self.latencies: deque[float] = deque(maxlen=window)

    def record_request(
        self, model: str, latency_s: float, prompt_tokens: int, completion_tokens: int
    ) -> None:
        with self._lock:
            self.requests += 1
            self.by_model[model] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.latencies.append(latency_s)

    def record_batch(self, adapters: Sequence[str], seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.mixed_batches += len(set(adapters)) > 1
            self.batch_rows += len(adapters)
            self.max_batch_rows = max(self.max_batch_rows, len(adapters))
            self.busy_s += seconds

    def record_error(self, status: int) -> None:
        with self._lock:
            self.errors[status] += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            lat = list(self.latencies)
            uptime = time.time() - self.started
            return {
                "requests": self.requests,
                "requests_by_model": dict(self.by_model),
                "errors_by_status": {str(k): v for k, v in self.errors.items()},
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "tokens_per_s": self.completion_tokens / self.busy_s if self.busy_s else 0.0,
                "uptime_tokens_per_s": self.completion_tokens / uptime if uptime else 0.0,
                "batches": self.batches,
                "mixed_batches": self.mixed_batches,
                "mean_batch_rows": self.batch_rows / self.batches if self.batches else 0.0,
                "max_batch_rows": self.max_batch_rows,
                "busy_s": self.busy_s,
                "uptime_s": uptime,
                "latency_s": {
                    "p50": percentile(lat, 50),
                    "p90": percentile(lat, 90),
                    "p99": percentile(lat, 99),
                    "count": len(lat),
                },
            }
