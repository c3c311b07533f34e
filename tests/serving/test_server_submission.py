"""``Submission`` alone, with a stand-in engine: all-or-nothing queueing under the bound, a failed prompt
cancelling its siblings, a disconnect cancelling everything, a closed stream cancelling what is left."""

from __future__ import annotations

import asyncio
import json

import pytest

from lorakit.serving.errors import ApiError
from lorakit.serving.limits import Limits
from lorakit.serving.parse import Parsed
from lorakit.serving.submission import ClientGone, GenerationFailed, Submission

LIMITS = Limits(max_prompts=3, max_queue=4)
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


class StandIn:
    """The two things a Submission asks of the engine."""

    def __init__(self, waiting: int = 0) -> None:
        self.waiting, self.got = waiting, []

    def submit(self, request) -> None:
        self.got.append(request)  # taken at once: ``waiting`` stays as set


def parsed(n: int, stream: bool = False) -> Parsed:
    sampling = {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "stop": []}
    return Parsed("m", "ad0", [[1, 2]] * n, sampling, stream, stream, chat=False)


def done(text: str) -> tuple:
    return ("done", {"text": text, "finish_reason": "stop", "usage": USAGE})


def test_queue_bound_is_all_or_nothing():
    async def scenario():
        engine = StandIn(waiting=2)
        with pytest.raises(ApiError) as e:
            Submission(parsed(3), asyncio.get_running_loop()).submit(engine, LIMITS)
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"} and engine.got == []
        Submission(parsed(2), asyncio.get_running_loop()).submit(engine, LIMITS)
        assert len(engine.got) == 2

    asyncio.run(scenario())


def test_results_in_order_and_a_failure_cancels_the_rest():
    async def scenario():
        engine = StandIn()
        sub = Submission(parsed(3), asyncio.get_running_loop())
        sub.submit(engine, LIMITS)
        a, b, c = engine.got
        b.emit(done("B"))
        a.emit(("delta", "A"))
        a.emit(done("A"))
        c.emit(done("C"))
        assert [r["text"] for r in await sub.results()] == ["A", "B", "C"]
        sub = Submission(parsed(3), asyncio.get_running_loop())
        sub.submit(engine, LIMITS)
        engine.got[3].emit(done("ok"))
        engine.got[4].emit(("error", "boom"))
        with pytest.raises(GenerationFailed, match="prompt 1 of 3 failed: boom; the request's other prompts"):
            await sub.results()
        assert engine.got[5].cancelled  # still generating: cancelled

    asyncio.run(scenario())


def test_disconnect_cancels_and_ends_the_wait():
    async def scenario():
        engine = StandIn()
        sub = Submission(parsed(2), asyncio.get_running_loop())
        sub.submit(engine, LIMITS)
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        sub.watch(receive)
        engine.got[0].emit(done("x"))
        gone.set()
        with pytest.raises(ClientGone):
            await sub.results()
        assert all(r.cancelled for r in engine.got)

    asyncio.run(scenario())


def test_stream_events_and_closing_the_stream_cancels():
    async def scenario():
        engine = StandIn()
        sub = Submission(parsed(2, stream=True), asyncio.get_running_loop())
        sub.submit(engine, LIMITS)
        head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}
        events = sub.sse(head, chat=False, include_usage=True)
        engine.got[1].emit(("delta", "hi"))
        first = json.loads((await events.__anext__())[6:])
        assert first["choices"][0] == {"index": 1, "text": "hi", "logprobs": None, "finish_reason": None}
        assert not any(r.cancelled for r in engine.got)
        await events.aclose()  # the client went away mid-stream
        assert all(r.cancelled for r in engine.got)
        sub = Submission(parsed(1, stream=True), asyncio.get_running_loop())
        sub.submit(engine, LIMITS)
        engine.got[2].emit(done("z"))
        out = [e async for e in sub.sse(head, chat=False, include_usage=True)]
        assert json.loads(out[-2][6:])["usage"] == USAGE and out[-1] == "data: [DONE]\n\n"

    asyncio.run(scenario())
