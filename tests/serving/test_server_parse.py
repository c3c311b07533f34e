"""Request parsing and response building tested alone (no server, no model): prompt shapes (text, token
arrays, lists of both), every bound and unsupported field answered with a one-line ApiError naming the
field, and the OpenAI body / SSE shapes."""

from __future__ import annotations

import json

import pytest

from lorakit.models.tokenizer import ByteTokenizer
from lorakit.serving.errors import ApiError, error_body
from lorakit.serving.limits import Limits
from lorakit.serving.mixed import BASE
from lorakit.serving.parse import ServedModel, decode_json, parse_request
from lorakit.serving.responses import DONE, completion_body, error_event, stream_chunk, usage_chunk

BOS = 257


class Registry:
    """The two things parsing asks of the adapter registry."""

    def __contains__(self, name):
        return name == "ad0"

    def names(self):
        return ["ad0"]


class NoBos(ByteTokenizer):
    def encode(self, text, text_pair=None, add_special_tokens=True):
        return super().encode(text, text_pair, add_special_tokens=False)


SERVED = ServedModel("tiny", ByteTokenizer(), max_context=64, vocab_size=260, registry=Registry())
LIMITS = Limits(max_prompts=3, max_queue=8)


def parse(body: dict, chat: bool = False, served: ServedModel = SERVED):
    return parse_request(body, served, LIMITS, chat)


def refused(body, status=400, param=None, code=None, chat=False, served=SERVED) -> str:
    with pytest.raises(ApiError) as e:
        parse(body, chat, served)
    err = e.value
    assert err.status == status and "\n" not in err.message and len(err.message) < 400, err.message
    assert param is None or err.param == param, err.param
    assert code is None or err.code == code, err.code
    return err.message


def test_prompt_shapes():
    assert parse({"model": "ad0", "prompt": "ab"}).prompts == [[BOS, 97, 98]]
    assert parse({"model": "ad0", "prompt": ["a", ""]}).prompts == [[BOS, 97], [BOS]]  # BOS: nothing empty
    assert parse({"model": "ad0", "prompt": [5, 6, 259]}).prompts == [[5, 6, 259]]  # token arrays as sent
    assert parse({"model": "ad0", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    got = parse({"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0, "stop": "\n"})
    assert got.adapter == BASE and got.model_name == "tiny" and not got.stream and not got.chat
    assert got.sampling == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"]}
    assert parse({"model": "base", "prompt": "x"}).sampling["max_tokens"] == 16


@pytest.mark.parametrize(
    ("prompt", "code", "words"),
    [
        ([260], "invalid_token_id", "0..259"),
        ([[1], [-1]], "invalid_token_id", "prompt 1"),
        ([1, True], None, "prompt 0"),
        ([[1, 2.0]], None, "token ids"),
        ([], None, "'prompt' must be"),
        ([[]], "empty_prompt", "empty token list"),
        ([["a"]], None, "a list of token ids, got ['a']"),
        ({"text": "a"}, None, "'prompt' must be"),
        (["a", "b", "c", "d"], "too_many_prompts", "at most 3"),
        ("x" * 64, "context_length_exceeded", "64 tokens"),
        ("\ud800", "invalid_value", "Unicode"),
    ],
)
def test_bad_prompts(prompt, code, words):
    assert words in refused({"model": "ad0", "prompt": prompt}, param="prompt", code=code)


def test_empty_text_prompt_needs_a_bos():
    served = ServedModel("tiny", NoBos(), 64, 260, Registry())
    msg = refused({"model": "ad0", "prompt": ""}, code="empty_prompt", served=served)
    assert "no BOS" in msg
    assert parse({"model": "ad0", "prompt": [1]}, served=served).prompts == [[1]]


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 2.0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 10**40}, "max_tokens", "context_length_exceeded"),
        ({"temperature": float("nan")}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"n": 2}, "n", "invalid_value"),
        ({"stop": ["a"] * 5}, "stop", None),
        ({"stream": "yes"}, "stream", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options", "invalid_value"),
        ({"logprobs": 2}, "logprobs", "unsupported_parameter"),
        ({"echo": True}, "echo", "unsupported_parameter"),
        ({"best_of": True}, "best_of", "unsupported_parameter"),  # True == 1, but not the integer 1
        ({"seed": 7}, "seed", "unsupported_parameter"),
        ({"temprature": 0.5}, "temprature", "unknown_parameter"),
        ({"user": 5}, "user", "invalid_value"),
        ({"model": "nope"}, "model", "model_not_found"),
        ({"model": 3}, "model", "invalid_value"),
    ],
)
def test_bad_fields(extra, param, code):
    status = 404 if code == "model_not_found" else 400
    refused({"model": "ad0", "prompt": "x", **extra}, status=status, param=param, code=code)


def test_neutral_values_of_unsupported_fields_are_accepted():
    body = {
        "model": "ad0",
        "prompt": "x",
        "logprobs": None,
        "echo": False,
        "best_of": 1,
        "presence_penalty": 0.0,
    }
    assert parse({**body, "frequency_penalty": 0, "logit_bias": {}, "suffix": None}).prompts == [[BOS, 120]]
    got = parse({"model": "ad0", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert got.stream and got.include_usage


def test_chat_parsing():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    got = parse({"model": "ad0", "messages": msgs, "max_completion_tokens": 4}, chat=True)
    expected = ByteTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        tokenize=True,
        add_generation_prompt=True,
    )
    assert got.chat and got.prompts == [expected] and got.sampling["max_tokens"] == 4
    one = [{"role": "user", "content": "hi"}]
    refused({"model": "ad0", "messages": one, "max_tokens": 3, "max_completion_tokens": 4}, chat=True)
    refused({"model": "ad0", "messages": [{"role": "robot", "content": "x"}]}, param="messages", chat=True)
    refused({"model": "ad0", "messages": [{"role": "user", "content": 5}]}, param="messages", chat=True)
    refused({"model": "ad0", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, chat=True)
    refused({"model": "ad0", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, chat=True)
    refused({"model": "ad0", "messages": []}, param="messages", chat=True)
    refused(
        {"model": "ad0", "messages": one, "tools": [{"type": "function"}]},
        code="unsupported_parameter",
        chat=True,
    )
    refused({"model": "ad0", "messages": one, "prompt": "x"}, code="unknown_parameter", chat=True)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"model": ', "invalid_json"),
        (b"\xff", "invalid_encoding"),
        (b"[1, 2]", "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # nested too deeply
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "invalid_json"),  # more digits than Python parses
    ],
)
def test_decode_json_refuses_cleanly(raw, code):
    with pytest.raises(ApiError) as e:
        decode_json(raw)
    assert e.value.status == 400 and e.value.code == code and len(e.value.message) < 200


def test_response_bodies_and_events():
    results = [
        {
            "text": "a",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        },
        {
            "text": "bc",
            "finish_reason": "length",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]
    head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}
    body = completion_body(head, results, chat=False)
    assert [c["text"] for c in body["choices"]] == ["a", "bc"] and body["choices"][1]["index"] == 1
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    chat = completion_body({**head, "object": "chat.completion"}, results, chat=True)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "a"}

    def data(event: str) -> dict:
        assert event.startswith("data: ") and event.endswith("\n\n")
        return json.loads(event[6:])

    assert data(stream_chunk(head, 1, "x", None, chat=False))["choices"] == [
        {"index": 1, "text": "x", "logprobs": None, "finish_reason": None}
    ]
    last = data(stream_chunk(head, 0, None, "stop", chat=True))
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["delta"] == {}
    assert data(usage_chunk(head, body["usage"], chat=False)) == {
        **head,
        "choices": [],
        "usage": body["usage"],
    }
    assert (
        data(error_event("boom")) == error_body(500, "boom", code="generation_failed")
        and DONE == "data: [DONE]\n\n"
    )
    assert error_body(429, "x")["error"]["type"] == "rate_limit_error"
    assert error_body(413, "x")["error"]["type"] == "invalid_request_error"
