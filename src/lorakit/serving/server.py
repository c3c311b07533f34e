"""OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn; binds 127.0.0.1 by default).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and with
``admin=True`` ``POST /v1/adapters`` ``{"name", "path"}`` / ``DELETE /v1/adapters/{name}`` to add and
remove adapters while serving. The request's ``model`` picks the adapter; the base model's name (or
``"base"``) picks the plain base. Bad requests get an OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` with status 400 (malformed or non-UTF-8 body,
bad field, too many tokens) or 404 (unknown model), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serving.engine import Engine, GenRequest
from lorakit.serving.mixed import BASE
from lorakit.serving.registry import RegistryError, UnknownAdapterError
from lorakit.surgery.inject import RESERVED_NAMES
from lorakit.train.tokenizer import adds_bos, has_chat_template


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _field(
    body: dict, name: str, types: type | tuple[type, ...], default: Any, check=None, expect: str = ""
) -> Any:
    """``body[name]`` (``default`` when absent or null), checked for type (bools are not numbers) and ``check``."""
    value = body.get(name)
    value = default if value is None else value
    if (
        not isinstance(value, types)
        or (isinstance(value, bool) and types is not bool)
        or (check and not check(value))
    ):
        raise ApiError(400, f"'{name}' must be {expect}, got {value!r}", param=name, code="invalid_value")
    return value


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, event: Any) -> None:
    """Hand an engine event (from the engine thread) to the request's queue on the server's loop."""
    loop.call_soon_threadsafe(events.put_nowait, (index, event))


def create_app(engine: Engine, base_name: str, max_context: int, admin: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine``; starts the engine thread on startup and stops it on shutdown."""
    tokenizer, registry, metrics = engine.tokenizer, engine.registry, engine.metrics
    bos = getattr(tokenizer, "bos_token_id", None) if adds_bos(tokenizer) else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.record_error(exc.status)
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.record_error(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(
                400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding"
            ) from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def resolve_model(body: dict) -> tuple[str, str]:
        name = _field(body, "model", str, "", lambda v: bool(v), "a model name (see /v1/models)")
        if name == base_name or name in RESERVED_NAMES:
            return name, BASE
        if name not in registry:
            raise ApiError(
                404,
                f"The model '{name}' does not exist; available: {[base_name, *registry.names()]}",
                param="model",
                code="model_not_found",
            )
        return name, name

    def sampling(body: dict, prompt_len: int) -> dict[str, Any]:
        room = max_context - prompt_len
        max_tokens = _field(body, "max_tokens", int, 16, lambda v: v >= 1, "a positive integer")
        if room < 1 or max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_context} tokens; the prompt has "
                f"{prompt_len} and max_tokens is {max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (
            not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
        ):
            raise ApiError(
                400, f"'stop' must be a string or a list of up to 4 non-empty strings, got {stop!r}", "stop"
            )
        _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per prompt)")
        return {
            "max_tokens": max_tokens,
            "temperature": float(
                _field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
            ),
            "top_p": float(
                _field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
            ),
            "stop": stop or [],
        }

    def encode(text: str) -> list[int]:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return [bos, *ids] if bos is not None else ids

    async def run(body: dict, model_name: str, adapter: str, prompts: list[list[int]], chat: bool):
        limits = [sampling(body, len(p)) for p in prompts]
        stream = _field(body, "stream", bool, False, None, "true or false")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, (ids, lim) in enumerate(zip(prompts, limits)):
            emit = functools.partial(_post, loop, events, i)
            engine.submit(GenRequest(ids, adapter, emit=emit, model_name=model_name, **lim))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        if stream:
            return StreamingResponse(sse(head, events, len(prompts), chat), media_type="text/event-stream")
        texts, done = [""] * len(prompts), [None] * len(prompts)
        while any(d is None for d in done):
            i, (kind, data) = await events.get()
            if kind == "error":  # already counted by the engine
                return JSONResponse(error_body(500, data, code="generation_failed"), status_code=500)
            if kind == "done":
                done[i] = data
                texts[i] = data["text"]
        usage = {
            k: sum(d["usage"][k] for d in done)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": d["finish_reason"],
                }
                for i, (t, d) in enumerate(zip(texts, done))
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": d["finish_reason"]}
                for i, (t, d) in enumerate(zip(texts, done))
            ]
        return {**head, "choices": choices, "usage": usage}

    async def sse(head: dict, events: asyncio.Queue, n: int, chat: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(i: int, text: str | None, finish: str | None) -> str:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text}
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        remaining = n
        while remaining:
            i, (kind, data) = await events.get()
            if kind == "delta":
                yield chunk(i, data, None)
            elif kind == "done":
                remaining -= 1
                yield chunk(i, None, data["finish_reason"])
            else:
                remaining -= 1
                yield f"data: {json.dumps(error_body(500, data, code='generation_failed'))}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        model_name, adapter = resolve_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(
                400, f"'prompt' must be a string or a non-empty list of strings, got {prompt!r}", "prompt"
            )
        return await run(body, model_name, adapter, [encode(p) for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        model_name, adapter = resolve_model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ApiError(
                400, '\'messages\' must be a non-empty list of {"role": str, "content": str}', "messages"
            )
        if not has_chat_template(tokenizer):
            raise ApiError(400, f"the tokenizer of {base_name!r} has no chat template; use /v1/completions")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return await run(body, model_name, adapter, [ids], chat=True)

    @app.get("/v1/models")
    async def models():
        loaded = set(registry.loaded())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit"}]
        data += [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "parent": base_name,
                "loaded": n in loaded,
            }
            for n in registry.names()
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return {**metrics.snapshot(), "adapters": registry.stats()}

    if admin:

        @app.post("/v1/adapters")
        async def add_adapter(request: Request):
            body = await read_json(request)
            name = _field(body, "name", str, "", bool, "an adapter name")
            path = _field(body, "path", str, "", bool, "an adapter directory")
            try:
                await run_in_threadpool(registry.register, name, path, True)
            except (ValueError, OSError, RuntimeError) as e:
                raise ApiError(400, f"cannot add adapter {name!r}: {e}", param="path") from None
            return {"id": name, "object": "model", "loaded": True}

        @app.delete("/v1/adapters/{name}")
        async def remove_adapter(name: str):
            try:
                await run_in_threadpool(registry.remove, name)
            except UnknownAdapterError as e:
                raise ApiError(404, str(e), param="name", code="model_not_found") from None
            except RegistryError as e:
                raise ApiError(400, str(e), param="name") from None
            return {"id": name, "object": "model", "deleted": True}

    return app


class ServerThread:
    """Run ``app`` with uvicorn in a background thread (tests, notebooks); ``port=0`` picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="lorakit-uvicorn", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def build_app(
    model: str,
    adapters: dict[str, str] | None = None,
    max_loaded: int | None = None,
    max_batch_size: int = 32,
    batch_wait_ms: float = 5.0,
    max_context: int | None = None,
    admin: bool = False,
    served_name: str | None = None,
) -> FastAPI:
    """Load base ``model`` (a builtin name or a local directory) and its tokenizer, register ``adapters``
    (name -> directory; the first ``max_loaded`` are loaded now, all are checked to be readable), and
    return the app. ``max_context`` defaults to the model's maximum positions."""
    from lorakit.io import read_adapter
    from lorakit.models import build_model
    from lorakit.serving.registry import AdapterRegistry
    from lorakit.train.tokenizer import load_tokenizer

    base = build_model(model, task="causal-lm")
    registry = AdapterRegistry(base, max_loaded=max_loaded)
    for i, (name, path) in enumerate((adapters or {}).items()):
        if max_loaded is not None and i >= max_loaded:
            read_adapter(path, name)  # fail at startup, not on the first request
            registry.register(name, path)
        else:
            registry.register(name, path, load=True)
    cfg = base.config
    limit = max_context or getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        raise ValueError(f"--max-context is needed: {model!r} does not state its maximum positions")
    engine = Engine(
        base,
        load_tokenizer(model),
        registry,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_ms / 1000,
    )
    return create_app(engine, served_name or model, int(limit), admin=admin)
