"""One HTTP request's prompts in the engine: submitting them (all or none, within the queue bound),
collecting their results or streaming them as server-sent events, and cancelling them when the client
disconnects or one of them fails. Engine events arrive from the engine thread through ``post``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lorakit.serving.engine import Engine, GenRequest
from lorakit.serving.errors import ApiError
from lorakit.serving.limits import Limits
from lorakit.serving.parse import Parsed
from lorakit.serving.responses import DONE, error_event, stream_chunk, total_usage, usage_chunk


def post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, event: Any) -> None:
    """Hand an engine event (from the engine thread) to the request's queue on the server's loop."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, (index, event))
    except RuntimeError:  # the loop has closed (server shut down): nobody is listening any more
        pass


class GenerationFailed(Exception):
    """A prompt of the request failed in the engine (already counted there as a 500)."""


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class Submission:
    """One HTTP request's prompts in the engine: their events, the disconnect watch, cancelling them all."""

    def __init__(self, parsed: Parsed, loop: asyncio.AbstractEventLoop) -> None:
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests = [
            GenRequest(
                ids,
                parsed.adapter,
                emit=functools.partial(post, loop, self.events, i),
                model_name=parsed.model_name,
                **parsed.sampling,
            )
            for i, ids in enumerate(parsed.prompts)
        ]
        self._watcher: asyncio.Task | None = None

    def submit(self, engine: Engine, limits: Limits) -> None:
        """Queue every prompt, or none: 429 when they would overflow ``limits.max_queue``."""
        if engine.waiting + len(self.requests) > limits.max_queue:
            raise ApiError(
                429,
                f"the server's queue is full ({engine.waiting} prompts waiting, max_queue={limits.max_queue}); "
                f"retry after {limits.retry_after_s} s",
                code="queue_full",
                headers={"Retry-After": str(limits.retry_after_s)},
            )
        for i, req in enumerate(self.requests):
            try:
                engine.submit(req)
            except ValueError as e:  # parse checks first, so this is a second line of defence
                self.cancel()
                raise ApiError(400, f"prompt {i}: {e}", param="prompt") from None

    def watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Cancel the prompts when the client disconnects (ASGI ``http.disconnect``)."""

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel()
            self.events.put_nowait((-1, ("gone", None)))

        self._watcher = asyncio.get_running_loop().create_task(wait_for_disconnect())

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()

    def close(self) -> None:
        """Stop watching and cancel whatever is still generating (a no-op for finished prompts)."""
        if self._watcher is not None:
            self._watcher.cancel()
        self.cancel()

    async def results(self) -> list[dict]:
        """Every prompt's ``done`` result in prompt order; the first failure cancels the others."""
        n = len(self.requests)
        results: list[dict | None] = [None] * n
        left = n
        while left:
            i, (kind, data) = await self.events.get()
            if kind == "gone":
                raise ClientGone
            if kind == "error":
                self.cancel()
                if n > 1:
                    data = f"prompt {i} of {n} failed: {data}; the request's other prompts were cancelled"
                raise GenerationFailed(data)
            if kind == "done":
                results[i] = data
                left -= 1
        return results  # type: ignore[return-value]

    async def sse(self, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events as tokens arrive; closing the stream cancels what is still generating."""
        try:
            left, done = len(self.requests), []
            while left:
                i, (kind, data) = await self.events.get()
                if kind == "gone":
                    return
                if kind == "delta":
                    yield stream_chunk(head, i, data, None, chat)
                elif kind == "done":
                    left -= 1
                    done.append(data)
                    yield stream_chunk(head, i, None, data["finish_reason"], chat)
                else:
                    left -= 1
                    yield error_event(data)
            if include_usage:
                yield usage_chunk(head, total_usage(done), chat)
            yield DONE
        finally:
            self.close()
