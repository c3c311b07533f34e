"""OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn; binds 127.0.0.1 by default).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and with
``admin=True`` ``POST /v1/adapters`` ``{"name", "path"}`` / ``DELETE /v1/adapters/{name}`` to add and
remove adapters while serving. The request's ``model`` picks the adapter; the base model's name (or
``"base"``) picks the plain base.

Jobs are split by module: ``parse`` validates a body into a ``Parsed`` request (per request, before
anything is batched), ``submission`` hands its prompts to the engine and gathers or streams their
results, ``responses`` builds bodies and SSE events, ``limits`` holds the bounds; this module reads
bodies (size-bounded) and wires routes to them. Bad requests get an OpenAI error body ``{"error": {"message", "type",
"param", "code"}}``: 400 (malformed body, bad field, too many prompts or tokens), 404 (unknown model),
413 (body over ``max_body_bytes``), 429 with ``Retry-After`` (engine queue full); the server keeps
serving. A client that disconnects cancels its prompts in the engine (streaming or not), and a failed
prompt of a multi-prompt request cancels the request's other prompts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lorakit.serving.engine import Engine
from lorakit.serving.errors import ApiError, error_body
from lorakit.serving.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPTS, DEFAULT_MAX_QUEUE, Limits
from lorakit.serving.parse import ServedModel, decode_json, field, parse_request
from lorakit.serving.registry import AdapterRegistry, RegistryError, UnknownAdapterError
from lorakit.serving.responses import completion_body, response_head
from lorakit.serving.submission import ClientGone, GenerationFailed, Submission

__all__ = ["ApiError", "ServerThread", "build_app", "create_app", "error_body"]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading when Content-Length says so)."""
    too_big = ApiError(
        413, f"request body exceeds {limit} bytes (the server's max_body_bytes)", code="body_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(
            499, "the client disconnected while sending the body", code="client_disconnected"
        ) from None
    return b"".join(chunks)


def _install_error_handlers(app: FastAPI, record: Callable[[int], None]) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        record(exc.status)
        body = error_body(exc.status, exc.message, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        record(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # a server bug: still an OpenAI body
        record(500)
        message = f"internal error: {type(exc).__name__}: {str(exc)[:200]}"
        return JSONResponse(error_body(500, message, code="internal_error"), status_code=500)


def create_app(
    engine: Engine,
    base_name: str,
    max_context: int,
    admin: bool = False,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """The FastAPI app serving ``engine``; starts the engine thread on startup and stops it on shutdown.

    Bounds (see ``lorakit.serving.limits``): ``max_context`` tokens of prompt + completion,
    ``max_prompts`` prompts per request, ``max_body_bytes`` per body, ``max_queue`` prompts waiting."""
    tokenizer, registry = engine.tokenizer, engine.registry
    limits = Limits(max_prompts=max_prompts, max_body_bytes=max_body_bytes, max_queue=max_queue)
    sizes = [v for v in (engine.vocab_size, _tokenizer_size(tokenizer)) if v]
    if not sizes:
        raise ValueError(
            "cannot tell the vocabulary size: the model has no input embeddings and the tokenizer no len()"
        )
    served = ServedModel(base_name, tokenizer, int(max_context), min(sizes), registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits
    _install_error_handlers(app, engine.metrics.record_error)

    async def generate(request: Request, chat: bool) -> Any:
        parsed = parse_request(
            decode_json(await read_body(request, limits.max_body_bytes)), served, limits, chat
        )
        sub = Submission(parsed, asyncio.get_running_loop())
        sub.submit(engine, limits)
        sub.watch(request.receive)
        head = response_head(parsed.model_name, chat)
        if parsed.stream:
            return StreamingResponse(
                sub.sse(head, chat, parsed.include_usage), media_type="text/event-stream"
            )
        try:
            results = await sub.results()
        except GenerationFailed as e:  # counted by the engine
            return JSONResponse(error_body(500, str(e), code="generation_failed"), status_code=500)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        finally:
            sub.close()
        return completion_body(head, results, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    _add_info_routes(app, engine, served, limits)
    if admin:
        _add_admin_routes(app, registry, limits)
    return app


def _add_info_routes(app: FastAPI, engine: Engine, served: ServedModel, limits: Limits) -> None:
    """``/v1/models``, ``/health`` and ``/metrics``."""
    registry, metrics, base_name, created = (
        engine.registry,
        engine.metrics,
        served.base_name,
        int(time.time()),
    )

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
        return {
            **metrics.snapshot(),
            "adapters": registry.stats(),
            "engine": engine.stats(),
            "limits": {**limits.as_dict(), "max_context": served.max_context},
        }


def _add_admin_routes(app: FastAPI, registry: AdapterRegistry, limits: Limits) -> None:
    """``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}``: change the servable adapters while serving."""

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = decode_json(await read_body(request, limits.max_body_bytes))
        name = field(body, "name", str, "", bool, "an adapter name")
        path = field(body, "path", str, "", bool, "an adapter directory")
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


def _tokenizer_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


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
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """Load base ``model`` (a builtin name or a local directory) and its tokenizer, register ``adapters``
    (name -> directory; the first ``max_loaded`` are loaded now, all are checked to be readable), and
    return the app. ``max_context`` defaults to the model's maximum positions; the other bounds are
    ``create_app``'s."""
    Limits(max_prompts=max_prompts, max_body_bytes=max_body_bytes, max_queue=max_queue)  # fail before loading
    from lorakit.io import read_adapter
    from lorakit.models import build_model
    from lorakit.models.builtin import require_causal_lm
    from lorakit.models.tokenizer import load_tokenizer
    from lorakit.serving.registry import AdapterRegistry

    require_causal_lm(model)  # serving an encoder would stream noise, or fail deep inside an adapter load
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
    return create_app(
        engine,
        served_name or model,
        int(limit),
        admin=admin,
        max_prompts=max_prompts,
        max_body_bytes=max_body_bytes,
        max_queue=max_queue,
    )
