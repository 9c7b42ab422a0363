"""The FastAPI app, its gateway middleware, and the uvicorn server that drains on SIGTERM.

Routes: ``POST /v1/embeddings`` (OpenAI), ``POST /embed`` and ``POST /tokenize``
(text-embeddings-inference style), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI, in ``completions.py``), ``GET /v1/models``,
``GET /health``, ``GET /metrics``.

``GatewayMiddleware`` runs before any route: 503 while draining, 401 without the API key,
413 for a body over the payload limit (it reads the body once, bounded, and replays it),
and the request-latency metric. A route's unexpected exception becomes a 500 with the
standard error body there too, so the server never dies on a request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Generator
from typing import Any, TypeVar

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slipstream import __version__
from slipstream.engine.engine import Engine
from slipstream.errors import InputError
from slipstream.server.async_engine import AsyncEngine
from slipstream.server.chat import ChatTemplate, ChatTemplateError
from slipstream.server.completions import add_generation_routes
from slipstream.server.errors import APIError, error_response, install_error_handlers, to_api_error
from slipstream.server.metrics import CONTENT_TYPE, ServerMetrics
from slipstream.server.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedRequest,
    ErrorResponse,
    HealthResponse,
    ModelList,
    Token,
    TokenizeRequest,
)
from slipstream.server.settings import ServerSettings
from slipstream.tokenization import normalize_inputs

logger = logging.getLogger("slipstream.server")

T = TypeVar("T")

ENDPOINTS = frozenset(
    {
        "/v1/embeddings",
        "/v1/completions",
        "/v1/chat/completions",
        "/embed",
        "/tokenize",
        "/v1/models",
        "/health",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)
OPEN_PATHS = frozenset({"/health", "/metrics"})  # no API key needed
# Past the payload limit, read (and drop) at most this much more of a body before answering
# 413, so that the client, still sending, reads the answer instead of a connection reset.
_DRAIN_CAP = 64 * 1024 * 1024


class ServerContext:
    """What the routes share: the engines, settings, metrics and the draining state."""

    def __init__(self, engine: Engine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.async_engine = AsyncEngine(
            engine,
            max_concurrent_inputs=settings.max_concurrent_requests,
            tokenizer_threads=settings.tokenizer_threads,
            metrics=metrics,
        )
        self.created = int(time.time())
        self.draining = False
        self.drain_started: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address: str | None = None
        self._warm = False
        self._ready_logged = False
        self._warm_task: asyncio.Task[None] | None = None
        # Read (and compiled) once; a broken template fails only the chat route.
        self.chat_template: ChatTemplate | None = None
        self.chat_template_problem: str | None = None
        if self.supports_generation:
            try:
                self.chat_template = ChatTemplate.load(engine.model_dir, settings.chat_template)
            except ChatTemplateError as e:
                self.chat_template_problem = str(e)
                logger.warning("%s: /v1/chat/completions will answer 400", e)

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.async_engine.start()
        # Warm up in the background: the port opens at once and /health says 503 until then.
        self._warm_task = asyncio.create_task(self._warm_up(), name="slipstream-warm-up")

    async def shutdown(self) -> None:
        self.begin_draining()
        assert self.drain_started is not None
        left = self.settings.shutdown_timeout - (time.monotonic() - self.drain_started)
        await self.async_engine.stop(timeout=max(left, 1.0))
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        logger.info("slipstream server stopped")

    def begin_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
            logger.info(
                "draining: no new requests; finishing %d in-flight inputs",
                self.async_engine.in_flight,
            )

    def mark_listening(self, address: str) -> None:
        self.address = address
        self._maybe_log_ready()

    async def _warm_up(self) -> None:
        try:
            seqs = [[0]]
            if self.engine.tokenizer is not None:
                seqs = await self.async_engine.tokenize(["warm-up"], truncate=True)
            await self.async_engine.embed(seqs)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("warm-up forward failed; /health answers 503 until one succeeds")
            return
        self._warm = True
        self._maybe_log_ready()

    def _maybe_log_ready(self) -> None:
        if self._warm and self.address and not self._ready_logged:
            self._ready_logged = True
            cfg = self.engine.config
            logger.info(
                "slipstream server ready on %s: model=%s (%s) device=%s dtype=%s backend=%s",
                self.address,
                self.settings.served_model_name,
                self.engine.model_dir,
                cfg.device,
                str(cfg.dtype).removeprefix("torch."),
                cfg.attention_backend,
            )

    # ------------------------------------------------------------------ request helpers
    def check_model(self, model: str | None) -> None:
        served = self.settings.served_model_name
        if model is not None and model != served:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    @property
    def supports_generation(self) -> bool:
        return self.engine.supports_generation

    def check_generation(self) -> None:
        """400 for a model that only embeds (BERT), before anything else is looked at."""
        if not self.supports_generation:
            arch = self.engine.model_config.arch
            raise APIError(
                400,
                f"model does not support generation: {self.settings.served_model_name!r} is a "
                f"{arch} model (embeddings only); text generation needs a causal LM (qwen3)",
                param="model",
                code="model_not_supported",
            )

    def require_chat_template(self) -> ChatTemplate:
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_template_problem is not None:
            message = self.chat_template_problem
        else:
            message = (
                f"the model {self.settings.served_model_name!r} has no chat template (no "
                "chat_template in its tokenizer_config.json): use /v1/completions with your own "
                "prompt format, or start the server with --chat-template FILE"
            )
        raise APIError(400, message, param="messages", code="chat_template_missing")

    def parse_inputs(self, inputs: Any, param: str) -> list[str | list[int]]:
        with _param_as(param):
            items = normalize_inputs(inputs)
        limit = self.settings.max_client_batch_size
        if len(items) > limit:
            raise APIError(
                413,
                f"{len(items)} inputs in one request; the limit is {limit} "
                "(--max-client-batch-size)",
                param=param,
                code="too_many_inputs",
            )
        return items

    async def guard(self, request: Request, work: Awaitable[T]) -> T:
        """Await ``work``, cancelling it if the client disconnects first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watcher.cancel()
            raise
        if task.done():
            watcher.cancel()
            return task.result()
        task.cancel()  # AsyncEngine.embed drops the request's queued inputs
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client closed the connection", code="client_disconnected")

    async def embed_items(
        self,
        request: Request,
        items: list[str | list[int]],
        *,
        normalize: bool,
        dimensions: int | None,
        prompt_name: str | None,
        truncate: bool,
        param: str,
    ) -> tuple[np.ndarray, int]:
        """Admit, tokenize, embed; the vectors and the number of tokens embedded."""
        ae = self.async_engine
        with ae.admit(len(items)):
            with _param_as(param):
                seqs = await self.guard(
                    request, ae.tokenize(items, prompt_name=prompt_name, truncate=truncate)
                )
            vecs = await self.guard(
                request, ae.embed(seqs, normalize=normalize, dimensions=dimensions)
            )
        tokens = sum(len(s) for s in seqs)
        self.metrics.prompt_tokens.inc(tokens)
        return vecs, tokens


@contextlib.contextmanager
def _param_as(param: str) -> Generator[None, None, None]:
    """The engine names its input ``input``; /embed and /tokenize call the field ``inputs``."""
    try:
        yield
    except InputError as e:
        if e.param == "input" and param != "input":
            raise InputError(str(e), param=param) from None
        raise


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not a disconnect (pipelined data): keep listening


def _json(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json")


def _b64(vec: np.ndarray) -> str:
    # little-endian float32, as the official OpenAI client decodes it
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


# ---------------------------------------------------------------------- middleware
class GatewayMiddleware:
    """Draining (503), API key (401), payload limit (413) and latency, before any route."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.ctx.metrics
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            await send(message)

        try:
            err = self._gate(scope)
            body = b""
            if err is None:
                body, err = await self._read_body(scope, receive)
            else:
                await self._drain(receive)
            if err is not None:
                await error_response(err, metrics)(scope, receive, tracked_send)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, tracked_send)
        except Exception as exc:
            if state["started"]:
                raise  # the response is half sent: let uvicorn close the connection
            logger.error("unexpected error on %s %s", scope.get("method"), path, exc_info=exc)
            await error_response(to_api_error(exc), metrics)(scope, receive, tracked_send)
        finally:
            metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
            metrics.requests.labels(endpoint=endpoint, status=str(state["status"])).inc()

    def _gate(self, scope: Scope) -> APIError | None:
        path = scope["path"]
        if self.ctx.draining and path != "/metrics":
            return APIError(
                503,
                "the server is draining and takes no new requests",
                code="draining",
                headers={"Retry-After": "1"},
            )
        key = self.ctx.settings.api_key
        if key is not None and path not in OPEN_PATHS:
            auth = _header(scope, b"authorization")
            if auth is None:
                return APIError(
                    401,
                    "missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), key.encode()
            ):
                return APIError(
                    401,
                    "invalid API key",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, APIError | None]:
        limit = self.ctx.settings.payload_limit
        too_large = APIError(
            413,
            f"the request body is over the payload limit of {limit} bytes (--payload-limit)",
            code="payload_too_large",
        )
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await self._drain(receive)
                    return b"", too_large
            except ValueError:
                return b"", APIError(400, "invalid Content-Length header")
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(
                    499, "the client closed the connection", code="client_disconnected"
                )
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                if message.get("more_body", False):
                    await self._drain(receive, total)
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    async def _drain(receive: Receive, seen: int = 0) -> None:
        """Read and drop the rest of the request body (bounded)."""
        while seen <= _DRAIN_CAP:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


# ---------------------------------------------------------------------- the app
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Invalid request (empty input, bad type, token id out of range, too long, ...)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Too many inputs or body over the payload limit"),
        (429, "Too many inputs in flight; retry later"),
        (500, "A forward pass failed"),
        (503, "Draining"),
    ]
}


def create_app(
    engine: Engine, settings: ServerSettings, metrics: ServerMetrics | None = None
) -> FastAPI:
    """The ASGI app. The AsyncEngine starts and stops with the app's lifespan."""
    ctx = ServerContext(engine, settings, ServerMetrics() if metrics is None else metrics)
    m = ctx.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ctx.startup()
        try:
            yield
        finally:
            await ctx.shutdown()

    app = FastAPI(
        title="slipstream",
        version=__version__,
        description="OpenAI-compatible embedding and text generation server (slipstream).",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.ctx = ctx
    install_error_handlers(app, m)
    app.add_middleware(GatewayMiddleware, ctx=ctx)

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=_ERRORS,
        summary="Create embeddings (OpenAI)",
    )
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        ctx.check_model(body.model)
        engine.check_dimensions(body.dimensions)
        items = ctx.parse_inputs(body.input, "input")
        vecs, tokens = await ctx.embed_items(
            request,
            items,
            normalize=True,
            dimensions=body.dimensions,
            prompt_name=None,
            truncate=settings.auto_truncate,
            param="input",
        )
        encode = _b64 if body.encoding_format == "base64" else np.ndarray.tolist
        data = [
            {"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(vecs)
        ]
        return _json(
            {
                "object": "list",
                "data": data,
                "model": settings.served_model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    add_generation_routes(app, ctx)

    @app.post(
        "/embed",
        response_model=list[list[float]],
        responses=_ERRORS,
        summary="Embed (text-embeddings-inference style)",
    )
    async def embed(body: EmbedRequest, request: Request) -> Response:
        engine.check_dimensions(body.dimensions)
        items = ctx.parse_inputs(body.inputs, "inputs")
        truncate = settings.auto_truncate if body.truncate is None else body.truncate
        vecs, _ = await ctx.embed_items(
            request,
            items,
            normalize=body.normalize,
            dimensions=body.dimensions,
            prompt_name=body.prompt_name,
            truncate=truncate,
            param="inputs",
        )
        return _json(vecs.tolist())

    @app.post(
        "/tokenize",
        response_model=list[list[Token]],
        responses=_ERRORS,
        summary="Token ids the server would embed, special tokens included",
    )
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        items = ctx.parse_inputs(body.inputs, "inputs")
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise APIError(
                400, f"the model in {engine.model_dir} has no tokenizer.json", param="inputs"
            )
        truncate = settings.auto_truncate if body.truncate is None else body.truncate
        with _param_as("inputs"):
            seqs = await ctx.guard(
                request,
                ctx.async_engine.tokenize(items, prompt_name=body.prompt_name, truncate=truncate),
            )
        return _json(
            [
                [{"id": i, "text": t} for i, t in zip(s, tokenizer.token_strings(s), strict=True)]
                for s in seqs
            ]
        )

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses={401: _ERRORS[401]},
        summary="The served model",
    )
    async def list_models() -> Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": settings.served_model_name,
                        "object": "model",
                        "created": ctx.created,
                        "owned_by": "slipstream",
                    }
                ],
            }
        )

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: _ERRORS[503]},
        summary="200 once a forward has succeeded; 503 while starting or draining",
    )
    async def health() -> Response:
        if ctx.draining:
            raise APIError(503, "the server is draining", code="draining")
        if not ctx.async_engine.healthy:
            raise APIError(
                503,
                "the model is loading or warming up",
                code="not_ready",
                headers={"Retry-After": "1"},
            )
        return _json({"status": "ok"})

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(m.render(), media_type=CONTENT_TYPE)

    return app


# ---------------------------------------------------------------------- the server
class SlipstreamServer(uvicorn.Server):
    """uvicorn's server, plus: draining on SIGTERM / SIGINT, a ready log line, exit status 0.

    uvicorn already stops accepting on a signal and waits (``timeout_graceful_shutdown``)
    for in-flight requests; this marks the app as draining first (so a request that still
    arrives on an open connection gets 503), and does not re-raise the signal after the
    graceful shutdown (uvicorn does, which would end the process with 128 + signal).
    """

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.ctx.begin_draining()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals only reach the main thread (an in-process test server)
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ctx.mark_listening(self._address())

    def request_exit(self) -> None:
        """Drain and stop from another thread (what SIGTERM does)."""
        self.ctx.begin_draining()
        self.should_exit = True

    def _address(self) -> str:
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                return f"http://{host}:{port}"
        return f"http://{self.config.host}:{self.config.port}"


def make_server(
    engine: Engine, settings: ServerSettings, metrics: ServerMetrics | None = None
) -> SlipstreamServer:
    app = create_app(engine, settings, metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the process's logging setup (one format for all lines)
        access_log=settings.access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(max(1, round(settings.shutdown_timeout))),
        server_header=False,
    )
    return SlipstreamServer(config, app.state.ctx)
