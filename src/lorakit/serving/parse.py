"""Request parsing and validation for the OpenAI-style routes: a JSON body in, a ``Parsed`` request or an
``ApiError`` (400/404) naming the field out. Runs once per request, before anything reaches the engine,
so a request that cannot run is refused on its own and never fails a batch it would have shared.

What is accepted (the OpenAI API's shapes):

- ``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists (at most
  ``Limits.max_prompts`` prompts). Strings get the tokenizer's BOS when it adds one (Llama yes, GPT-2
  no); token arrays are used exactly as sent. Every id must be in ``[0, vocab_size)``; a prompt must
  have at least one token and leave room for one more within ``max_context``.
- ``messages`` (chat): ``{"role": "system"|"user"|"assistant", "content": str | [{"type": "text",
  "text": str}, ...]}``, rendered with the tokenizer's chat template.
- sampling: ``max_tokens`` (chat also ``max_completion_tokens``; default 16, prompt + it within the
  context), ``temperature`` [0, 2], ``top_p`` (0, 1], ``stop`` (up to 4 strings), ``n`` = 1,
  ``stream``, ``stream_options.include_usage``, ``user``.
- OpenAI fields this server cannot honour (``logprobs``, ``echo``, ``best_of``, penalties, ``seed``,
  ``tools``, ...) are accepted only at their "ask for nothing" value; any other value, and any field
  OpenAI does not define, is a 400 naming it: never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.models.tokenizer import adds_bos, has_chat_template
from lorakit.serving.errors import ApiError
from lorakit.serving.limits import Limits
from lorakit.serving.mixed import BASE
from lorakit.serving.registry import AdapterRegistry
from lorakit.surgery.inject import RESERVED_NAMES

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "user"}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt"})
CHAT_FIELDS = frozenset(_COMMON | {"messages", "max_completion_tokens"})
# OpenAI fields the server cannot honour: allowed only as null or these values (which ask for nothing)
_NEUTRAL_COMMON: dict[str, tuple] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "seed": (),
}
NEUTRAL_COMPLETION = {**_NEUTRAL_COMMON, "echo": (False,), "logprobs": (), "best_of": (1,), "suffix": ()}
NEUTRAL_CHAT = {
    **_NEUTRAL_COMMON,
    "logprobs": (False,),
    "top_logprobs": (),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
}
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 16


def show(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, so an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServedModel:
    """What parsing needs to know about the served model.

    Args:
        base_name: the model id of the plain base. tokenizer: its tokenizer.
        max_context: prompt + completion limit in tokens. vocab_size: valid ids are ``[0, vocab_size)``.
        registry: the servable adapters (the request's ``model`` picks one).
    """

    base_name: str
    tokenizer: Any
    max_context: int
    vocab_size: int
    registry: AdapterRegistry

    @property
    def bos(self) -> int | None:
        return getattr(self.tokenizer, "bos_token_id", None) if adds_bos(self.tokenizer) else None

    def encode(self, text: str, label: str) -> list[int]:
        """Token ids of a text prompt, with the BOS the tokenizer would add."""
        try:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        except UnicodeError:
            raise bad(f"{label} is not valid Unicode (a lone surrogate?)", "prompt") from None
        return [self.bos, *ids] if self.bos is not None else ids


@dataclass(frozen=True)
class Parsed:
    """A validated request: which adapter, the prompts' token ids and the engine's sampling arguments."""

    model_name: str
    adapter: str
    prompts: list[list[int]]
    sampling: dict[str, Any]  # GenRequest keywords: max_tokens, temperature, top_p, stop
    stream: bool
    include_usage: bool
    chat: bool


def decode_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 ``invalid_encoding`` / ``invalid_json`` otherwise)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise bad("request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        raise bad(f"request body is not valid JSON: {str(e)[:120]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    return body


def field(
    body: dict,
    name: str,
    types: type | tuple[type, ...],
    default: Any,
    check: Callable[[Any], bool] | None = None,
    expect: str = "",
) -> Any:
    """``body[name]`` (``default`` when absent or null), checked for type (bools are not numbers) and ``check``."""
    value = body.get(name)
    value = default if value is None else value
    if value is None:  # absent, and no default: the caller decides
        return None
    if (
        not isinstance(value, types)
        or (isinstance(value, bool) and types is not bool)
        or (check and not check(value))
    ):
        raise bad(f"'{name}' must be {expect}, got {show(value)}", param=name)
    return value


def check_fields(body: dict, known: frozenset[str], neutral: dict[str, tuple]) -> None:
    """Refuse fields OpenAI does not define and fields the server cannot honour (see the module docstring)."""
    for name, value in body.items():
        if name in known:
            continue
        if name not in neutral:
            raise bad(
                f"Unrecognized request argument supplied: {show(name)} (accepted: {sorted(known | set(neutral))})",
                param=str(name),
                code="unknown_parameter",
            )
        allowed = neutral[name]
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            ok = ", ".join(["null", *(json.dumps(a) for a in allowed)])
            raise bad(
                f"'{name}' is not supported by this server: got {show(value)}, expected {ok}",
                param=name,
                code="unsupported_parameter",
            )


def resolve_model(body: dict, served: ServedModel) -> tuple[str, str]:
    """(model id as asked, adapter name or ``BASE``); 404 ``model_not_found`` for an unknown id."""
    name = field(body, "model", str, "", bool, "a model name (see /v1/models)")
    if name == served.base_name or name in RESERVED_NAMES:
        return name, BASE
    if name not in served.registry:
        raise ApiError(
            404,
            f"The model {show(name)} does not exist; available: {[served.base_name, *served.registry.names()]}",
            param="model",
            code="model_not_found",
        )
    return name, name


def _is_token(value: Any) -> bool:
    return type(value) is int  # not bool


def check_prompt(ids: list[int], label: str, served: ServedModel, from_text: bool) -> None:
    """A prompt must have a token, ids in the vocabulary, and room for one more token in the context."""
    if not ids:
        if from_text:
            raise bad(
                f"{label} is empty and this model's tokenizer adds no BOS token, so there is nothing to "
                "generate from; send at least one token",
                "prompt",
                "empty_prompt",
            )
        raise bad(f"{label} is an empty token list", "prompt", "empty_prompt")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= served.vocab_size:
        raise bad(
            f"{label} has token id {lo if lo < 0 else hi}; this model's ids are 0..{served.vocab_size - 1}",
            "prompt",
            "invalid_token_id",
        )
    if len(ids) >= served.max_context:
        raise bad(
            f"{label} has {len(ids)} tokens; this model's maximum context length is {served.max_context} "
            "tokens (prompt + completion)",
            "prompt",
            "context_length_exceeded",
        )


def completion_prompts(body: dict, served: ServedModel, limits: Limits) -> list[list[int]]:
    """Token ids of each prompt of a ``/v1/completions`` body (see the module docstring for the shapes)."""
    prompt = body.get("prompt")
    shapes = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(map(_is_token, prompt))):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad(f"'prompt' must be {shapes}, got {show(prompt)}", "prompt", None)
    if len(items) > limits.max_prompts:
        raise bad(
            f"'prompt' has {len(items)} prompts; at most {limits.max_prompts} per request",
            "prompt",
            "too_many_prompts",
        )
    prompts = []
    for i, item in enumerate(items):
        label = "'prompt'" if len(items) == 1 else f"prompt {i}"
        if isinstance(item, str):
            ids = served.encode(item, label)
        elif isinstance(item, list) and all(map(_is_token, item)):
            ids = list(item)
        else:
            raise bad(
                f"{label} must be a string or a list of token ids, got {show(item)}", "prompt", "invalid_type"
            )
        check_prompt(ids, label, served, from_text=isinstance(item, str))
        prompts.append(ids)
    return prompts


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and len(p) == 2
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad(
        f"messages[{i}].content must be a string or a list of {{'type': 'text', 'text': str}} parts, "
        f"got {show(content)}",
        "messages",
    )


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    """Token ids of a ``/v1/chat/completions`` body's ``messages`` rendered with the chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(
            f'\'messages\' must be a non-empty list of {{"role": str, "content": str}}, got {show(messages)}',
            "messages",
        )
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content', got {show(m)}", "messages")
        extra = [k for k in m if k not in ("role", "content") and m[k] is not None]
        if extra:
            raise bad(
                f"messages[{i}]: unsupported key {show(extra[0])} (only 'role' and 'content')", "messages"
            )
        if m.get("role") not in CHAT_ROLES:
            raise bad(
                f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {show(m.get('role'))}", "messages"
            )
        msgs.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    tok = served.tokenizer
    if not has_chat_template(tok):
        raise bad(
            f"the tokenizer of {served.base_name!r} has no chat template; use /v1/completions", "messages"
        )
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tok.encode(text, add_special_tokens=False))
    except UnicodeError:
        raise bad("'messages' is not valid Unicode (a lone surrogate?)", "messages") from None
    except Exception as e:  # a Jinja template's raise_exception (e.g. roles must alternate)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise bad(f"the chat template cannot render these messages: {first}", "messages") from None
    check_prompt(ids, "the rendered conversation", served, from_text=True)
    return ids


def sampling(body: dict, prompts: list[list[int]], max_context: int, chat: bool) -> dict[str, Any]:
    """The engine's sampling arguments; prompt + ``max_tokens`` must fit the context for every prompt."""
    max_tokens = field(body, "max_tokens", int, None, lambda v: v >= 1, "a positive integer")
    if chat:
        alias = field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "a positive integer")
        if alias is not None and max_tokens is not None and alias != max_tokens:
            raise bad(
                f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({alias}) disagree; send one",
                "max_completion_tokens",
            )
        max_tokens = max_tokens if max_tokens is not None else alias
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    longest = max(len(p) for p in prompts)
    if max_tokens > max_context - longest:
        raise bad(
            f"This model's maximum context length is {max_context} tokens; the prompt has {longest} and "
            f"max_tokens is {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad(f"'stop' must be a string or a list of up to 4 non-empty strings, got {show(stop)}", "stop")
    field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per prompt)")
    return {
        "max_tokens": max_tokens,
        "temperature": float(
            field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
        ),
        "top_p": float(field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "stop": stop or [],
    }


def streaming(body: dict) -> tuple[bool, bool]:
    """(``stream``, ``stream_options.include_usage``)."""
    stream = field(body, "stream", bool, False, None, "true or false")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise bad(f"'stream_options' must be {{'include_usage': bool}}, got {show(opts)}", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad(
            f"'stream_options.include_usage' must be true or false, got {show(usage)}", "stream_options"
        )
    return stream, usage


def parse_request(body: dict, served: ServedModel, limits: Limits, chat: bool) -> Parsed:
    """Validate a completions (``chat=False``) or chat completions body into a ``Parsed`` request."""
    if chat:
        check_fields(body, CHAT_FIELDS, NEUTRAL_CHAT)
    else:
        check_fields(body, COMPLETION_FIELDS, NEUTRAL_COMPLETION)
    model_name, adapter = resolve_model(body, served)
    prompts = [chat_prompt(body, served)] if chat else completion_prompts(body, served, limits)
    args = sampling(body, prompts, served.max_context, chat)
    field(body, "user", str, "", None, "a string")
    stream, include_usage = streaming(body)
    return Parsed(model_name, adapter, prompts, args, stream, include_usage, chat)
