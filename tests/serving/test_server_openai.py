"""The server driven by the official ``openai`` Python client (``max_retries=0``): completions (text, token
arrays, several prompts), chat, streaming (with ``include_usage``), and errors arriving as the client's
typed exceptions (404, 400 with ``code``/``param``, 413, 429 with ``Retry-After``)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from lorakit.serving.server import ServerThread, build_app

from .helpers import write_adapters

BOS = 257


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dirs = write_adapters(str(tmp_path_factory.mktemp("adapters")), ["ad0", "ad1"])
    app = build_app("tiny-llama", dirs, max_context=256, batch_wait_ms=5, max_queue=64)
    srv = ServerThread(app).start()
    yield srv, app.state.engine
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    srv, _ = server
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def raw(srv, path: str, body: dict) -> dict:
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_text_token_arrays_and_several_prompts(server, client):
    srv, _ = server
    got = client.completions.create(model="ad0", prompt="The cat", max_tokens=8, temperature=0)
    expected = raw(
        srv, "/v1/completions", {"model": "ad0", "prompt": "The cat", "max_tokens": 8, "temperature": 0}
    )
    assert got.object == "text_completion" and got.model == "ad0"
    assert got.choices[0].text == expected["choices"][0]["text"] and got.usage.prompt_tokens == 8
    # the same prompt as token ids (BOS included by hand: token arrays are used as sent)
    ids = [BOS, *b"The cat"]
    as_ids = client.completions.create(model="ad0", prompt=ids, max_tokens=8, temperature=0)
    assert as_ids.choices[0].text == got.choices[0].text
    several = client.completions.create(
        model="ad1", prompt=[ids, [BOS, *b"dog"]], max_tokens=5, temperature=0
    )
    alone = client.completions.create(model="ad1", prompt=[BOS, *b"dog"], max_tokens=5, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[1].text == alone.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + 4


def test_chat_and_streaming(client):
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="ad1", messages=msgs, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="ad1",
            messages=msgs,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    plain = client.completions.create(model="tiny-llama", prompt="stream", max_tokens=6, temperature=0)
    streamed = client.completions.create(
        model="tiny-llama", prompt="stream", max_tokens=6, temperature=0, stream=True
    )
    parts = list(streamed)
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text
    assert parts[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_errors_are_typed_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ad0", prompt="x" * 250, max_tokens=10)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ad0", prompt="x", logprobs=3)
    assert e.value.code == "unsupported_parameter" and e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ad0", prompt=[300])
    assert e.value.code == "invalid_token_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ad0", messages=[{"role": "user", "content": "x"}], n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="ad0", prompt="x" * (1 << 20))
    assert e.value.status_code == 413 and e.value.code == "body_too_large"
    assert client.completions.create(model="ad0", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_queue_full_is_a_rate_limit_error(server, client):
    srv, engine = server
    engine.stop()
    filler = threading.Thread(
        target=httpx.post,
        args=(f"{srv.url}/v1/completions",),
        kwargs={"json": {"model": "ad0", "prompt": ["q"] * 64, "max_tokens": 1}, "timeout": 60},
    )
    try:
        filler.start()
        deadline = time.time() + 20
        while engine.waiting < 64:
            assert time.time() < deadline and filler.is_alive()
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="ad0", prompt="x", max_tokens=1)
        assert e.value.code == "queue_full" and e.value.response.headers["retry-after"] == "1"
    finally:
        engine.start()
        filler.join(timeout=60)
    assert client.completions.create(model="ad0", prompt="ok", max_tokens=2).choices[0].finish_reason
