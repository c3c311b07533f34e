"""Bounds on what one client may ask of the server, with their defaults (documented in the README).

Every bound is answered with an OpenAI-style error body, never by a crash or a stalled server:

- ``max_prompts`` (64): prompts in one ``/v1/completions`` request (``prompt`` as a list) -> 400
  ``too_many_prompts``.
- ``max_body_bytes`` (1 MiB): request body size -> 413 ``body_too_large``; a body announced larger is
  refused before it is read.
- ``max_queue`` (256): prompts waiting for the engine (submitted, not yet decoding); a request whose
  prompts would overflow it -> 429 ``queue_full`` with ``Retry-After: retry_after_s``.
- the context (``max_context``, from the model): a prompt must leave room for one token (-> 400
  ``context_length_exceeded`` on ``prompt``) and prompt + ``max_tokens`` must fit (-> on ``max_tokens``).

This module imports nothing heavy, so the CLI can read the defaults for its flags.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PROMPTS = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 256
DEFAULT_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    """The server's per-request and queue bounds (see the module docstring)."""

    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    retry_after_s: int = DEFAULT_RETRY_AFTER_S

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_body_bytes", "max_queue", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.max_prompts > self.max_queue:
            raise ValueError(
                f"max_prompts={self.max_prompts} exceeds max_queue={self.max_queue}: such a request could "
                "never be queued"
            )

    def as_dict(self) -> dict[str, int]:
        return {
            "max_prompts": self.max_prompts,
            "max_body_bytes": self.max_body_bytes,
            "max_queue": self.max_queue,
            "retry_after_s": self.retry_after_s,
        }
