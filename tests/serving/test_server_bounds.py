"""The server under bad clients, on a live 127.0.0.1 server: a client that disconnects has its generation
cancelled while the rest of its batch goes on; a failing prompt of a multi-prompt request cancels the
others; every bound (prompts per request, body size, prompt vs context, max_tokens, queue depth) answers
with an OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import lorakit
from lorakit.models.tokenizer import ByteTokenizer
from lorakit.serving.engine import Engine
from lorakit.serving.registry import AdapterRegistry
from lorakit.serving.server import ServerThread, create_app

from .helpers import write_adapters

FAULT = 259  # a prompt holding this id (<unk>) makes FaultyEngine fail the batch it is in
LONG = {"model": "tiny-llama", "prompt": "long", "max_tokens": 400, "temperature": 0}  # no EOS within 400
COMPANION = {"model": "ad1", "prompt": "companion", "max_tokens": 30, "temperature": 0}  # no EOS within 80
BOS = 257


class FaultyEngine(Engine):
    """The real engine, with a fault injected for batches holding the FAULT token and an optional delay per
    decode step (so a long request is still running when its client goes away)."""

    step_delay = 0.0

    def _decode(self, batch):
        if any(FAULT in r.prompt_ids for r in batch):
            raise RuntimeError("injected fault")
        return super()._decode(batch)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    dirs = write_adapters(str(tmp_path_factory.mktemp("adapters")), ["ad0", "ad1"])
    model = lorakit.build_model("tiny-llama")
    registry = AdapterRegistry(model)
    for name, path in dirs.items():
        registry.register(name, path, load=True)
    engine = FaultyEngine(model, ByteTokenizer(), registry, batch_wait_s=0.1)
    model.register_forward_pre_hook(lambda m, a: time.sleep(engine.step_delay) if engine.step_delay else None)
    app = create_app(engine, "tiny-llama", max_context=512, max_prompts=4, max_body_bytes=4096, max_queue=6)
    srv = ServerThread(app).start()
    yield srv, engine
    srv.stop()


@pytest.fixture
def slow(served):
    _, engine = served
    engine.step_delay = 0.002  # >= 0.8 s for LONG if it were not cancelled
    yield
    engine.step_delay = 0.0


def metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics").json()


def wait_for(check, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def assert_serving(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "ad0", "prompt": "ok", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_only_that_request(served, slow, stream):
    srv, engine = served
    ref = httpx.post(f"{srv.url}/v1/completions", json=COMPANION, timeout=60).json()["choices"][0]["text"]
    before = metrics(srv.url)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:

            async def drop():
                if stream:  # read the first token, then hang up
                    async with ac.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                return
                else:  # give up waiting: the client closes the connection
                    with pytest.raises(httpx.ReadTimeout):
                        await ac.post("/v1/completions", json=LONG, timeout=0.25)

            task = asyncio.create_task(drop())
            await asyncio.sleep(0.02)  # same batch window (0.1 s), LONG first
            companion = await ac.post("/v1/completions", json=COMPANION)
            await task
            return companion

    companion = asyncio.run(scenario())
    assert companion.status_code == 200 and companion.json()["choices"][0]["text"] == ref
    wait_for(lambda: metrics(srv.url)["engine"]["cancelled"] == before["engine"]["cancelled"] + 1)
    after = metrics(srv.url)
    assert after["mixed_batches"] > before["mixed_batches"]  # they did share a batch
    assert after["requests"] - before["requests"] == 1  # the dropped request never completed
    assert after["engine"]["running"] == 0 and after["engine"]["waiting"] == 0
    assert_serving(srv.url)


def test_failing_prompt_cancels_the_other_prompts(served, slow):
    srv, engine = served
    before = metrics(srv.url)
    engine.max_batch_size = 1  # one prompt per batch: the failing one first, the others queued behind it
    try:
        prompts = [[BOS, FAULT], [BOS, *b"long"], [BOS, *b"long"]]
        r = httpx.post(
            f"{srv.url}/v1/completions",
            json={"model": "tiny-llama", "prompt": prompts, "max_tokens": 400, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "generation_failed" and err["type"] == "server_error"
        assert "prompt 0 of 3 failed" in err["message"] and "injected fault" in err["message"]
        assert "cancelled" in err["message"]
        wait_for(lambda: metrics(srv.url)["engine"]["cancelled"] == before["engine"]["cancelled"] + 2)
    finally:
        engine.max_batch_size = 32
    after = metrics(srv.url)
    assert after["requests"] == before["requests"] and after["engine"]["running"] == 0
    assert_serving(srv.url)


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60, **kw)


def check_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "\n" not in err["message"], err
    assert param is None or err["param"] == param
    return err


def test_bounds_prompts_body_context(served):
    srv, _ = served
    ok = post(srv.url, json={"model": "ad0", "prompt": ["a", "b", "c", "d"], "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    err = check_error(post(srv.url, json={"model": "ad0", "prompt": list("abcde")}), 400, "too_many_prompts")
    assert "at most 4" in err["message"]
    check_error(
        post(srv.url, content=b" " * 4097, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )
    padded = b'{"model": "ad0", "prompt": "x"}' + b" " * (4096 - 31)  # exactly at the bound: served
    assert len(padded) == 4096 and post(srv.url, content=padded).status_code == 200
    err = check_error(
        post(srv.url, json={"model": "ad0", "prompt": "x" * 511}), 400, "context_length_exceeded", "prompt"
    )
    assert "512 tokens" in err["message"] and "prompt' has 512" in err["message"]
    check_error(
        post(srv.url, json={"model": "ad0", "prompt": "x" * 500, "max_tokens": 12}),
        400,
        "context_length_exceeded",
        "max_tokens",
    )
    assert post(srv.url, json={"model": "ad0", "prompt": "x" * 500, "max_tokens": 11}).status_code == 200
    limits = metrics(srv.url)["limits"]
    assert limits == {
        "max_prompts": 4,
        "max_body_bytes": 4096,
        "max_queue": 6,
        "retry_after_s": 1,
        "max_context": 512,
    }
    assert_serving(srv.url)


def test_queue_full_is_429_with_retry_after(served):
    srv, engine = served
    engine.stop()  # nothing is taken from the queue until the engine starts again
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                body = {"model": "ad0", "max_tokens": 2}
                first = asyncio.create_task(ac.post("/v1/completions", json={**body, "prompt": list("abcd")}))
                await asyncio.sleep(0)
                while engine.waiting < 4:
                    await asyncio.sleep(0.01)
                full = await ac.post("/v1/completions", json={**body, "prompt": list("xyz")})  # 4 + 3 > 6
                fits = asyncio.create_task(ac.post("/v1/completions", json={**body, "prompt": list("xy")}))
                while engine.waiting < 6:
                    await asyncio.sleep(0.01)
                one_more = await ac.post("/v1/completions", json={**body, "prompt": "z"})
                engine.start()
                return full, one_more, await first, await fits

        full, one_more, first, fits = asyncio.run(scenario())
    finally:
        engine.start()
    for r in (full, one_more):
        err = check_error(r, 429, "queue_full")
        assert r.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
    assert first.status_code == 200 and len(first.json()["choices"]) == 4
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
    assert metrics(srv.url)["errors_by_status"]["429"] >= 2
    assert_serving(srv.url)
