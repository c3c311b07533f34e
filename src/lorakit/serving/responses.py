"""Response bodies and server-sent events in OpenAI's shapes, built from the engine's ``done`` results.

A result is the engine's ``("done", data)`` payload: ``{"text", "finish_reason", "usage": {"prompt_tokens",
"completion_tokens", "total_tokens"}}``. Streams are ``data: <json>\\n\\n`` lines ending in
``data: [DONE]\\n\\n``; chat chunks carry ``delta``, completion chunks ``text``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lorakit.serving.errors import error_body

DONE = "data: [DONE]\n\n"
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def response_head(model_name: str, chat: bool) -> dict[str, Any]:
    """The fields every body and chunk of one response shares (one id per request)."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
    }


def total_usage(results: Sequence[dict]) -> dict[str, int]:
    return {k: sum(r["usage"][k] for r in results) for k in USAGE_KEYS}


def completion_body(head: dict, results: Sequence[dict], chat: bool) -> dict[str, Any]:
    """The non-streaming body: one choice per prompt, in prompt order, and the summed usage."""
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "finish_reason": r["finish_reason"],
            }
            for i, r in enumerate(results)
        ]
    else:
        choices = [
            {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ]
    return {**head, "choices": choices, "usage": total_usage(results)}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def stream_chunk(head: dict, index: int, text: str | None, finish: str | None, chat: bool) -> str:
    """One SSE event: new ``text`` of choice ``index`` (None with ``finish`` for the last one)."""
    if chat:
        delta = {} if text is None else {"role": "assistant", "content": text}
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return _event({**head, "object": obj, "choices": [choice]})


def usage_chunk(head: dict, usage: dict[str, int], chat: bool) -> str:
    """The extra last chunk asked for by ``stream_options: {"include_usage": true}``: no choices, the usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return _event({**head, "object": obj, "choices": [], "usage": usage})


def error_event(message: str, code: str = "generation_failed") -> str:
    """A failure inside a stream (the status line has already gone out as 200)."""
    return _event(error_body(500, message, code=code))
