"""Property-based tests of the HTTP API (Hypothesis): requests built in the real shape with exactly one
thing broken (a field missing, of the wrong type, out of range or huge; an unknown or unsupported field;
a malformed, deep or oversized body). Every one gets a 4xx with a one-line OpenAI error body, never a
5xx, and after each batch of examples valid requests still succeed. One live 127.0.0.1 server with the
default bounds is shared by the module; each test sends a bounded number of requests."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.serving.parse import CHAT_FIELDS, COMPLETION_FIELDS, NEUTRAL_CHAT, NEUTRAL_COMPLETION
from lorakit.serving.server import ServerThread, build_app

from .helpers import write_adapters

CONTEXT = 256
MODELS = ["tiny-llama", "ad0", "ad1", "base"]
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    dirs = write_adapters(str(tmp_path_factory.mktemp("adapters")), ["ad0", "ad1"])
    srv = ServerThread(build_app("tiny-llama", dirs, max_context=CONTEXT)).start()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c
    srv.stop()


# ---------------------------------------------------------------- valid shapes
texts = st.text(max_size=12)  # no surrogates: Hypothesis leaves them out by default
token_arrays = st.lists(st.integers(0, 259), min_size=1, max_size=8)
prompts = st.one_of(
    texts,
    st.lists(texts, min_size=1, max_size=3),
    token_arrays,
    st.lists(token_arrays, min_size=1, max_size=3),
)
stops = st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4))
sampling = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": stops,
    "stream": st.booleans(),
    "n": st.just(1),
    "user": texts,
}
completions = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "prompt": prompts, "max_tokens": st.integers(1, 2)},
    optional={**sampling, "echo": st.just(False), "logprobs": st.none()},
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}),
    min_size=1,
    max_size=3,
)
chats = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "messages": messages, "max_tokens": st.integers(1, 2)},
    optional={**sampling, "presence_penalty": st.just(0)},
)

# ---------------------------------------------------------------- what a broken value looks like
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=8)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
not_str = anything.filter(lambda v: not isinstance(v, str))
not_bool = anything.filter(lambda v: v is not None and not isinstance(v, bool))
not_int = anything.filter(lambda v: v is not None and (type(v) is not int))
not_number = anything.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
)
bad_token = st.one_of(st.integers(260, 10**30), st.integers(-(10**30), -1))
huge_text = st.integers(CONTEXT, 20_000).map(lambda n: "x" * n)


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


def _setting(key: str, values: st.SearchStrategy):
    return lambda draw, body: {**body, key: draw(values)}


def _bad_element(draw, body):
    """A prompt list with one element that is neither a string nor a token-id list."""
    good = draw(st.lists(texts, min_size=1, max_size=3) | st.lists(token_arrays, min_size=1, max_size=3))
    bad = draw(
        anything.filter(
            lambda v: (
                not isinstance(v, (str, list)) or (isinstance(v, list) and not all(type(t) is int for t in v))
            )
        )
    )
    good.insert(draw(st.integers(0, len(good))), bad)
    return {**body, "prompt": good}


def _out_of_vocab(draw, body):
    ids = draw(token_arrays)
    ids[draw(st.integers(0, len(ids) - 1))] = draw(bad_token)
    return {**body, "prompt": ids if draw(st.booleans()) else [[1, 2], ids]}


def _unknown_field(known: frozenset, neutral: dict):
    names = st.text(min_size=1, max_size=12).filter(lambda n: n not in known and n not in neutral)
    return lambda draw, body: {**body, draw(names): draw(anything)}


SHARED_BREAKS = {
    "model missing": lambda draw, body: _without(body, "model"),
    "model not a string": _setting("model", not_str),
    "model unknown": _setting(
        "model", st.text(max_size=12).filter(lambda s: s not in MODELS and s != "__base__")
    ),
    "max_tokens not an int": _setting("max_tokens", not_int),
    "max_tokens out of range": _setting(
        "max_tokens", st.integers(max_value=0) | st.integers(CONTEXT, 10**40)
    ),
    "temperature not a number": _setting("temperature", not_number),
    "temperature out of range": _setting(
        "temperature", st.floats(max_value=-1e-6) | st.floats(min_value=2.000001) | st.just(float("nan"))
    ),
    "top_p out of range": _setting("top_p", st.floats(max_value=0) | st.floats(min_value=1.000001)),
    "n not 1": _setting("n", st.integers().filter(lambda n: n != 1) | not_int),
    "stop too many": _setting("stop", st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=9)),
    "stop bad element": _setting(
        "stop",
        st.lists(st.text(max_size=0) | not_str.filter(lambda v: v is not None), min_size=1, max_size=4),
    ),
    "stop not a list": _setting(
        "stop", st.integers() | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
    ),
    "stream not a bool": _setting("stream", not_bool),
    "stream_options without stream": lambda draw, body: {
        **body,
        "stream": False,
        "stream_options": {"include_usage": True},
    },
    "user not a string": _setting("user", not_str.filter(lambda v: v is not None)),
    "unsupported value": lambda draw, body: {
        **body,
        **draw(
            st.sampled_from(
                [
                    {"presence_penalty": 0.5},
                    {"frequency_penalty": -1},
                    {"seed": 3},
                    {"logit_bias": {"1": 5}},
                ]
            )
        ),
    },
}
COMPLETION_BREAKS = {
    **SHARED_BREAKS,
    "prompt missing": lambda draw, body: _without(body, "prompt"),
    "prompt wrong type": _setting(
        "prompt",
        scalars.filter(lambda v: not isinstance(v, str))
        | st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    ),
    "prompt bad element": _bad_element,
    "prompt empty": _setting("prompt", st.sampled_from([[], [[]], [[1], []], [[], [2, 3]]])),
    "prompt token out of vocabulary": _out_of_vocab,
    "prompt longer than the context": _setting(
        "prompt", huge_text | st.integers(CONTEXT, 3000).map(lambda n: [65] * n)
    ),
    "too many prompts": _setting("prompt", st.integers(65, 300).map(lambda n: ["p"] * n)),
    "unknown field": _unknown_field(COMPLETION_FIELDS, NEUTRAL_COMPLETION),
    "completion-only unsupported": lambda draw, body: {
        **body,
        **draw(
            st.sampled_from(
                [
                    {"echo": True},
                    {"logprobs": 0},
                    {"best_of": 2},
                    {"suffix": "x"},
                    {"best_of": True},
                ]
            )
        ),
    },
}
CHAT_BREAKS = {
    **SHARED_BREAKS,
    "messages missing": lambda draw, body: _without(body, "messages"),
    "messages wrong type": _setting(
        "messages", not_str.filter(lambda v: not isinstance(v, list)) | texts | st.just([])
    ),
    "message not an object": lambda draw, body: {
        **body,
        "messages": [*body["messages"], draw(not_str.filter(lambda v: not isinstance(v, dict)) | texts)],
    },
    "message bad role": lambda draw, body: {
        **body,
        "messages": [
            {
                "role": draw(anything.filter(lambda r: r not in ("system", "user", "assistant"))),
                "content": "x",
            }
        ],
    },
    "message bad content": lambda draw, body: {
        **body,
        "messages": [
            {
                "role": "user",
                "content": draw(
                    not_str.filter(lambda c: not isinstance(c, list))
                    | st.lists(
                        st.dictionaries(st.sampled_from(["type", "text", "image_url"]), scalars, max_size=3),
                        min_size=1,
                        max_size=2,
                    ).filter(
                        lambda ps: (
                            not all(
                                isinstance(p, dict)
                                and p.get("type") == "text"
                                and isinstance(p.get("text"), str)
                                and len(p) == 2
                                for p in ps
                            )
                        )
                    )
                ),
            }
        ],
    },
    "message extra key": lambda draw, body: {
        **body,
        "messages": [{"role": "user", "content": "x", "name": draw(st.text(max_size=5))}],
    },
    "max_completion_tokens out of range": _setting(
        "max_completion_tokens", st.integers(max_value=0) | st.integers(CONTEXT, 10**9)
    ),
    "conversation longer than the context": lambda draw, body: {
        **body,
        "messages": [{"role": "user", "content": draw(huge_text)}],
    },
    "unknown field": _unknown_field(CHAT_FIELDS, NEUTRAL_CHAT),
    "chat-only unsupported": lambda draw, body: {
        **body,
        **draw(
            st.sampled_from(
                [
                    {"logprobs": True},
                    {"top_logprobs": 2},
                    {"tools": [{"type": "function"}]},
                    {"tool_choice": "auto"},
                    {"response_format": {"type": "json_object"}},
                ]
            )
        ),
    },
}


@st.composite
def broken(draw, valid: st.SearchStrategy, breaks: dict, kind: str) -> bytes:
    """A valid body with the one thing ``kind`` names broken, as JSON bytes."""
    return json.dumps(breaks[kind](draw, draw(valid))).encode()


@st.composite
def broken_bodies(draw) -> tuple[str, bytes]:
    """The body itself is wrong: not JSON, not UTF-8, not an object, too deep, too big, a number too long."""
    raw = json.dumps(draw(completions)).encode()
    kind = draw(
        st.sampled_from(["truncated", "not utf-8", "not an object", "deep", "too big", "long number"])
    )
    if kind == "truncated":
        return kind, raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "not utf-8":
        at = draw(st.integers(0, len(raw)))
        return kind, raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    if kind == "not an object":
        return kind, json.dumps(draw(anything.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "deep":
        n = draw(st.integers(500, 200_000))
        return kind, b'{"model": "ad0", "prompt": ' + b"[" * n + b"]" * n + b"}"
    if kind == "too big":
        return kind, b'{"model": "ad0", "prompt": "' + b"y" * draw(
            st.integers(1 << 20, (1 << 20) + 5000)
        ) + b'"}'
    return kind, b'{"model": "ad0", "prompt": "x", "max_tokens": 1' + b"0" * draw(
        st.integers(4300, 6000)
    ) + b"}"


def assert_client_error(client: httpx.Client, path: str, kind: str, raw: bytes) -> None:
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, (kind, err)
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], (kind, err)
    assert err["type"] == "invalid_request_error", (kind, err)


def assert_still_serving(client: httpx.Client, chat: bool = False) -> None:
    """A valid request succeeds, and no request so far got a 5xx."""
    if chat:
        body = {"model": "ad1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    else:
        body = {"model": "ad0", "prompt": ["a", [1, 2]], "max_tokens": 1}
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"], r.text
    errors = client.get("/metrics").json()["errors_by_status"]
    assert all(int(status) < 500 for status in errors), errors


@pytest.mark.parametrize("kind", sorted(COMPLETION_BREAKS))
def test_fuzz_completions(client, kind):
    @settings(FUZZ, max_examples=10)
    @given(raw=broken(completions, COMPLETION_BREAKS, kind))
    def run(raw):
        assert_client_error(client, "/v1/completions", kind, raw)

    run()
    assert_still_serving(client)


@pytest.mark.parametrize("kind", sorted(CHAT_BREAKS))
def test_fuzz_chat(client, kind):
    @settings(FUZZ, max_examples=6)
    @given(raw=broken(chats, CHAT_BREAKS, kind))
    def run(raw):
        assert_client_error(client, "/v1/chat/completions", kind, raw)

    run()
    assert_still_serving(client, chat=True)


def test_fuzz_bodies(client):
    @settings(FUZZ, max_examples=60)
    @given(case=broken_bodies(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def run(case, path):
        kind, raw = case
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        expected = 413 if kind == "too big" else 400
        assert r.status_code == expected and "message" in r.json()["error"], (
            kind,
            r.status_code,
            r.text[:200],
        )

    run()
    assert_still_serving(client)
    assert_still_serving(client, chat=True)


def test_valid_requests_in_the_fuzzed_shapes_succeed(client):
    """The generators above make valid requests before they break one thing: check that they are."""

    @settings(FUZZ, max_examples=15)
    @given(body=completions, chat=chats)
    def run(body, chat):
        for path, b in (("/v1/completions", body), ("/v1/chat/completions", chat)):
            r = client.post(path, json=b)
            assert r.status_code == 200, (b, r.text[:300])

    run()
