"""The real server on a free 127.0.0.1 port, driven over HTTP: outputs match offline generation, concurrent
requests for different adapters share batches, bad requests get OpenAI error bodies, a bounded load test."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

import lorakit
from lorakit.io import load_adapter
from lorakit.models.tokenizer import load_tokenizer
from lorakit.serving.server import ServerThread, build_app

from .helpers import write_adapters

NAMES = [f"ad{i}" for i in range(8)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_adapters(str(tmp_path_factory.mktemp("adapters")), NAMES + ["extra"])


@pytest.fixture(scope="module")
def server(dirs):
    adapters = {n: dirs[n] for n in NAMES}
    app = build_app("tiny-llama", adapters, max_loaded=6, batch_wait_ms=30, max_context=256, admin=True)
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def offline(dirs, adapter: str | None, prompt: str, max_tokens: int) -> str:
    """Greedy HF generate on a fresh base with the adapter loaded and set (or the plain base)."""
    model = lorakit.build_model("tiny-llama")
    tok = load_tokenizer("tiny-llama")
    if adapter is not None:
        load_adapter(model, dirs[adapter], adapter)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]])
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


def complete(client, model, prompt="Hello", max_tokens=12, **kw):
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_health_models_and_offline_equality(client, dirs):
    assert client.get("/health").json() == {"status": "ok"}
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny-llama", *NAMES]
    texts = {}
    for model, adapter in [("ad0", "ad0"), ("ad3", "ad3"), ("tiny-llama", None)]:
        body = complete(client, model, "The cat", max_tokens=10)
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["usage"]["prompt_tokens"] == 8  # <s> + 7 bytes
        texts[model] = body["choices"][0]["text"]
        assert texts[model] == offline(dirs, adapter, "The cat", 10), model
    assert len(set(texts.values())) == 3  # the adapters change the output


def test_concurrent_requests_for_different_adapters_batch_together(server, client, dirs):
    before = client.get("/metrics").json()

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            reqs = [
                ac.post(
                    "/v1/completions",
                    json={"model": m, "prompt": f"row {i}", "max_tokens": 6, "temperature": 0},
                )
                for i, m in enumerate(["ad1", "ad2", "ad5", "tiny-llama", "ad1", "ad4"])
            ]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    after = client.get("/metrics").json()
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6  # some requests shared a batch
    assert after["mixed_batches"] > before["mixed_batches"]  # ... with different adapters in it
    assert after["requests_by_model"]["ad1"] >= 2
    # a request's output does not depend on what it was batched with
    assert responses[2].json()["choices"][0]["text"] == offline(dirs, "ad5", "row 2", 6)


def test_streaming_completion_and_chat(client):
    plain = complete(client, "ad2", "stream me", max_tokens=8)["choices"][0]["text"]
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": "ad2", "prompt": "stream me", "max_tokens": 8, "temperature": 0, "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.post(
        "/v1/chat/completions", json={"model": "ad6", "messages": msgs, "max_tokens": 5, "temperature": 0}
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "ad6", "messages": msgs, "max_tokens": 5, "temperature": 0, "stream": True},
    ) as r:
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert text == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (dict(json={"model": "nope", "prompt": "x"}), 404, "model_not_found"),
        (dict(content=b'{"model": "ad0", "prompt": '), 400, "invalid_json"),
        (dict(content=b'{"model": "ad0", "prompt": "\xff\xfe"}'), 400, "invalid_encoding"),
        (dict(json={"model": "ad0", "prompt": "x" * 250, "max_tokens": 10}), 400, "context_length_exceeded"),
        (dict(json={"model": "ad0", "prompt": "x", "max_tokens": "many"}), 400, "invalid_value"),
        (dict(json={"model": "ad0", "prompt": "x", "temperature": 5}), 400, "invalid_value"),
        (dict(json={"model": "ad0"}), 400, None),
        (dict(json=["not", "an", "object"]), 400, "invalid_json"),
    ],
)
def test_bad_requests_are_rejected_cleanly(client, kwargs, status, code):
    r = client.post("/v1/completions", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == code
    assert complete(client, "ad0", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")


def test_unknown_route_and_chat_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/chat/completions", json={"model": "ad0", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_add_and_remove_adapter_while_serving(client, dirs):
    r = client.post("/v1/adapters", json={"name": "extra", "path": dirs["extra"]})
    assert r.status_code == 200, r.text
    assert complete(client, "extra", "The cat", max_tokens=6)["choices"][0]["text"] == offline(
        dirs, "extra", "The cat", 6
    )
    assert client.delete("/v1/adapters/extra").status_code == 200
    assert client.post("/v1/completions", json={"model": "extra", "prompt": "x"}).status_code == 404
    assert client.delete("/v1/adapters/extra").status_code == 404


def test_bounded_load(server, client):
    """200 requests over 8 adapters (max_loaded=6, so some reload from disk), 32 in flight at a time."""

    async def load():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:

            async def one(i):
                async with sem:
                    return await ac.post(
                        "/v1/completions",
                        json={
                            "model": NAMES[i % 8],
                            "prompt": f"load {i}",
                            "max_tokens": 4,
                            "temperature": 0.7,
                        },
                    )

            return await asyncio.gather(*(one(i) for i in range(200)))

    before = client.get("/metrics").json()
    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 200
    m = client.get("/metrics").json()
    assert m["requests"] - before["requests"] == 200
    assert m["latency_s"]["p50"] is not None and m["latency_s"]["p99"] >= m["latency_s"]["p50"]
    assert m["adapters"]["evictions"] > 0 and len(m["adapters"]["loaded"]) <= 6
    print(
        f"\nload test: 200 requests, p50 {m['latency_s']['p50'] * 1e3:.0f} ms, p99 {m['latency_s']['p99'] * 1e3:.0f} ms, "
        f"{m['tokens_per_s']:.0f} tokens/s, mean batch {m['mean_batch_rows']:.1f} rows"
    )
    assert client.get("/health").status_code == 200
