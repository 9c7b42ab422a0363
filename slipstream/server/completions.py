"""Text generation routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

A request is checked (model name, generation support, sampling fields), admitted (one input
in flight per prompt, 429 above the limit), tokenized in a tokenizer thread (the chat
template is rendered there too), checked against the model's context, and handed to
``AsyncEngine.generate``. A non-streaming answer waits for every prompt to finish; a
streaming one (``stream: true``) sends one server-sent event per step that produced text,
then ``data: [DONE]``. A client that leaves (either way) has its requests aborted, which
frees their KV pages. Errors found before the first token are HTTP errors with the
standard body; a failure after the stream started is sent as one ``data: {"error": ...}``
event (the OpenAI clients raise it) and the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from slipstream.errors import InputError
from slipstream.sampling import SamplingParams
from slipstream.server.async_engine import Admission, GenerationStream
from slipstream.server.errors import to_api_error
from slipstream.server.metrics import ServerMetrics
from slipstream.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)

if TYPE_CHECKING:
    from slipstream.engine.gen_request import GenerationOutput
    from slipstream.server.app import ServerContext

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_SEED = 2**63 - 1
# Below this, temperature counts as 0 (greedy): dividing logits by a subnormal number
# overflows float32 and the sampler would draw from NaNs (vLLM does the same).
MIN_TEMPERATURE = 1e-5
# top_p is a float32 on the device; a smaller value would round to 0 and mask every token.
MIN_TOP_P = 1e-9

_GEN_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (
            400,
            "Invalid request (empty prompt, bad sampling value, prompt + max_tokens over the "
            "context, token id out of range, n != 1, a model that does not generate, no chat "
            "template, ...)",
        ),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Too many prompts or body over the payload limit"),
        (429, "Too many inputs in flight; retry later"),
        (500, "A forward pass failed"),
        (503, "Draining"),
    ]
}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"}}}


@dataclass(frozen=True, slots=True)
class GenOptions:
    """The sampling fields of a request, checked once (OpenAI names in the errors)."""

    max_tokens: int | None  # None: the default (16 for completions, the context for chat)
    max_tokens_param: str
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool


def parse_options(
    body: CompletionRequest | ChatCompletionRequest,
    *,
    vocab_size: int,
    context_len: int,
    max_completion_tokens: int | None,
) -> GenOptions:
    """Validate the sampling fields; raises InputError naming the field."""
    _reject_unsupported(body)
    if body.n is not None and body.n != 1:
        raise InputError(
            f"n must be 1, got {body.n}: several choices per prompt are not supported "
            "(send a list of prompts, or the request again with another seed)",
            param="n",
        )
    max_tokens, param = body.max_tokens, "max_tokens"
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise InputError(
                "max_tokens and max_completion_tokens differ: give one of them",
                param="max_completion_tokens",
            )
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"{param} must be >= 1, got {max_tokens}", param=param)
        if max_completion_tokens is not None and max_tokens > max_completion_tokens:
            raise InputError(
                f"{param} is {max_tokens}, over this server's limit of {max_completion_tokens} "
                "(--max-completion-tokens)",
                param=param,
            )
        if max_tokens >= context_len:
            raise InputError(
                f"{param} is {max_tokens}; the model's context is {context_len} tokens, "
                "prompt included",
                param=param,
            )
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InputError(
            f"temperature must be a finite number >= 0, got {body.temperature}",
            param="temperature",
        )
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not 0.0 < top_p <= 1.0:  # (NaN fails too)
        raise InputError(f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    top_k = 0 if body.top_k is None else body.top_k
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (0: off), got {top_k}", param="top_k")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise InputError(f"seed must be in [0, 2**63 - 1], got {body.seed}", param="seed")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(s == "" for s in stop):
        raise InputError("stop strings must not be empty", param="stop")
    stop_ids = tuple(body.stop_token_ids or ())
    bad = next((t for t in stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InputError(
            f"stop token id {bad} is outside [0, {vocab_size}) (the model's vocabulary)",
            param="stop_token_ids",
        )
    stream = bool(body.stream)
    include_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
    return GenOptions(
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=temperature,
        top_p=max(top_p, MIN_TOP_P),
        top_k=min(top_k, vocab_size),  # more than the vocabulary is the vocabulary
        stop=stop,
        seed=body.seed,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.ignore_eos),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=bool(body.return_token_ids),
    )


def _reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    def no(param: str, what: str) -> InputError:
        return InputError(f"{param} is not supported by this server ({what})", param=param)

    if body.logprobs not in (None, False):
        raise no("logprobs", "leave it out or set it to null or false")
    if body.presence_penalty not in (None, 0):
        raise no("presence_penalty", "only 0")
    if body.frequency_penalty not in (None, 0):
        raise no("frequency_penalty", "only 0")
    if body.logit_bias:
        raise no("logit_bias", "only an empty map")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise no("echo", "only false")
        if body.best_of not in (None, 1):
            raise no("best_of", "only 1")
        if body.suffix is not None:
            raise no("suffix", "leave it out")
    else:
        if body.top_logprobs not in (None, 0):
            raise no("top_logprobs", "leave it out")
        if body.tools:
            raise no("tools", "tool calls are not implemented")


def sampling_params(
    seqs: list[list[int]],
    opts: GenOptions,
    *,
    context_len: int,
    default_tokens: int,
    prompt_param: str,
) -> list[SamplingParams]:
    """One SamplingParams per prompt; raises InputError when a prompt and its max_tokens do
    not fit the context. ``default_tokens``: max_tokens when not given (lowered to the
    room the context leaves)."""
    out = []
    for i, ids in enumerate(seqs):
        room = context_len - len(ids)
        what = "the prompt" if len(seqs) == 1 else f"prompt {i}"
        if room < 1:
            raise InputError(
                f"{what} has {len(ids)} tokens; the model's context is {context_len} tokens "
                "and at least one must be left to generate",
                param=prompt_param,
            )
        if opts.max_tokens is None:
            n = min(default_tokens, room)
        else:
            n = opts.max_tokens
            if n > room:
                raise InputError(
                    f"{what} has {len(ids)} tokens and {opts.max_tokens_param} is {n}: "
                    f"{len(ids) + n} tokens, over the model's context of {context_len}",
                    param=opts.max_tokens_param,
                )
        out.append(
            SamplingParams(
                max_new_tokens=n,
                temperature=opts.temperature,
                top_p=opts.top_p,
                top_k=opts.top_k,
                seed=opts.seed,
                stop=opts.stop,
                stop_token_ids=opts.stop_token_ids,
                ignore_eos=opts.ignore_eos,
            )
        )
    return out


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template sees them: role and content strings."""
    if not messages:
        raise InputError("messages must not be empty", param="messages")
    out = []
    for m in messages:
        content = m.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            text = "\n".join(part.text for part in content)
        d: dict[str, Any] = {"role": m.role, "content": text}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


# ---------------------------------------------------------------------- server-sent events
def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class EventStream(Response):
    """A ``text/event-stream`` response fed by an async iterator of encoded events.

    It watches the connection while it waits for the next event: when the client leaves it
    stops at once (it does not wait for the next token to notice). ``on_close`` runs in all
    cases, exactly once (it aborts what is unfinished and releases the admission).
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        on_close: Callable[[], None],
        metrics: ServerMetrics | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self._chunks = chunks
        self._on_close = on_close
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        disconnected = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            it = self._chunks.__aiter__()
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                    disconnected = True
                    break
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    disconnected = True
                    break
            if not disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
            self._on_close()
            if disconnected and self._metrics is not None:
                self._metrics.failures.labels(reason="client_disconnected").inc()


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not a disconnect (pipelined data): keep listening


# ---------------------------------------------------------------------- responses
@dataclass(frozen=True, slots=True)
class _Reply:
    """What every chunk or answer of one request shares."""

    id: str
    created: int
    model: str
    chat: bool
    opts: GenOptions
    prompts: list[list[int]]

    @property
    def object(self) -> str:
        if self.chat:
            return "chat.completion.chunk" if self.opts.stream else "chat.completion"
        return "text_completion"

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in self.prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def answer(self, outputs: list[GenerationOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outputs):
            text = out.text or ""
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = None
            choice["finish_reason"] = out.finish_reason
            if self.opts.return_token_ids:
                choice["prompt_token_ids"] = self.prompts[i]
                choice["token_ids"] = list(out.token_ids)
            choices.append(choice)
        body = self.head()
        body["choices"] = choices
        body["usage"] = self.usage(sum(len(o.token_ids) for o in outputs))
        return body

    def chunk(self, choice: dict[str, Any]) -> bytes:
        body = self.head()
        body["choices"] = [choice]
        if self.opts.include_usage:
            body["usage"] = None
        return sse(body)

    async def events(
        self, stream: GenerationStream, metrics: ServerMetrics
    ) -> AsyncIterator[bytes]:
        completion_tokens = 0
        try:
            if self.chat:  # the assistant's role first, as OpenAI does
                yield self.chunk(
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            async for d in stream:
                completion_tokens += len(d.token_ids)
                if not (d.text or d.finished or self.opts.return_token_ids):
                    continue  # nothing to show yet (text held back, or incomplete UTF-8)
                choice: dict[str, Any] = {"index": d.index}
                if self.chat:
                    choice["delta"] = {"content": d.text} if d.text else {}
                else:
                    choice["text"] = d.text
                choice["logprobs"] = None
                choice["finish_reason"] = d.finish_reason if d.finished else None
                if self.opts.return_token_ids:
                    choice["token_ids"] = d.token_ids
                yield self.chunk(choice)
        except Exception as e:  # after the 200: report it in the stream, then end it
            err = to_api_error(e)
            metrics.failures.labels(reason=err.reason).inc()
            yield sse(json.loads(err.body()))
            return
        if self.opts.include_usage:
            body = self.head()
            body["choices"] = []
            body["usage"] = self.usage(completion_tokens)
            yield sse(body)
        yield SSE_DONE


async def _collect(stream: GenerationStream, n: int) -> list[GenerationOutput]:
    outputs: list[GenerationOutput | None] = [None] * n
    try:
        async for d in stream:
            if d.finished:
                outputs[d.index] = d.output
    finally:
        stream.close()
    assert all(o is not None for o in outputs)
    return [o for o in outputs if o is not None]


def _json(payload: Any) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=200, media_type="application/json")


# ---------------------------------------------------------------------- routes
def add_generation_routes(app: FastAPI, ctx: ServerContext) -> None:
    engine = ctx.engine
    settings = ctx.settings
    ae = ctx.async_engine
    metrics = ctx.metrics
    context_len = engine.model_config.max_position_embeddings
    vocab_size = engine.model_config.vocab_size

    def options(body: CompletionRequest | ChatCompletionRequest) -> GenOptions:
        ctx.check_model(body.model)
        ctx.check_generation()
        return parse_options(
            body,
            vocab_size=vocab_size,
            context_len=context_len,
            max_completion_tokens=settings.max_completion_tokens,
        )

    async def run(
        request: Request,
        reply: _Reply,
        admission: Admission,
        params: list[SamplingParams],
        fit_to_cache: bool,
    ) -> Response:
        """Generate and answer; owns ``admission`` (released when the answer is done)."""
        try:
            stream = ae.generate(reply.prompts, params, fit_to_cache=fit_to_cache)
        except BaseException:
            admission.release()
            raise
        if not reply.opts.stream:
            try:
                outputs = await ctx.guard(request, _collect(stream, len(reply.prompts)))
            finally:
                stream.close()
                admission.release()
            return _json(reply.answer(outputs))
        try:
            # Errors found before the first token (e.g. the KV cache cannot hold the
            # request) are still plain HTTP errors.
            await ctx.guard(request, stream.first())
        except BaseException:
            stream.close()
            admission.release()
            raise

        def on_close() -> None:
            stream.close()
            admission.release()

        return EventStream(reply.events(stream, metrics), on_close, metrics)

    def default_tokens() -> int:
        limit = settings.max_completion_tokens
        return DEFAULT_COMPLETION_TOKENS if limit is None else min(DEFAULT_COMPLETION_TOKENS, limit)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_GEN_ERRORS, 200: {"content": _STREAM_DOC}},
        summary="Create a completion (OpenAI); stream=true for server-sent events",
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        opts = options(body)
        items = ctx.parse_inputs(body.prompt, "prompt")
        admission = ae.reserve(len(items))
        try:
            seqs = await ctx.guard(request, ae.tokenize_prompts(items))
            params = sampling_params(
                seqs,
                opts,
                context_len=context_len,
                default_tokens=default_tokens(),
                prompt_param="prompt",
            )
        except BaseException:
            admission.release()
            raise
        reply = _Reply(
            f"cmpl-{uuid.uuid4().hex}",
            int(time.time()),
            settings.served_model_name,
            False,
            opts,
            seqs,
        )
        return await run(request, reply, admission, params, opts.max_tokens is None)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_GEN_ERRORS, 200: {"content": _STREAM_DOC}},
        summary="Create a chat completion (OpenAI); needs the model's chat template",
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        opts = options(body)
        messages = message_dicts(body.messages)
        template = ctx.require_chat_template()

        def prompt_ids() -> list[list[int]]:
            text = template.render(messages)
            if not text:
                raise InputError("the chat template rendered an empty prompt", param="messages")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(
                    "a message is not valid Unicode text (it holds a lone surrogate)",
                    param="messages",
                ) from None
            ids = ae.encode_texts([text], "messages")[0]
            if not ids:
                raise InputError("the chat prompt tokenizes to no tokens", param="messages")
            return [ids]

        admission = ae.reserve(1)
        try:
            seqs = await ctx.guard(request, ae.run_in_tokenizer_thread(prompt_ids))
            limit = settings.max_completion_tokens
            params = sampling_params(
                seqs,
                opts,
                context_len=context_len,
                default_tokens=context_len if limit is None else limit,
                prompt_param="messages",
            )
        except BaseException:
            admission.release()
            raise
        reply = _Reply(
            f"chatcmpl-{uuid.uuid4().hex}",
            int(time.time()),
            settings.served_model_name,
            True,
            opts,
            seqs,
        )
        return await run(request, reply, admission, params, opts.max_tokens is None)


__all__ = ["EventStream", "GenOptions", "add_generation_routes", "parse_options"]
