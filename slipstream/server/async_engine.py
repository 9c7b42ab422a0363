"""AsyncEngine: one model thread owns the model; HTTP handlers enqueue and await.

The model thread is a ``ModelWorker`` (``worker.py``). It runs, in turn, one embedding
forward (when inputs are queued) and one generation step (when generation requests are
unfinished), so embeddings and generations share the model without starving each other.

Embeddings: a handler is admitted (``admit``: the in-flight input count, 429 above the
limit), tokenizes its inputs in a thread (``tokenize``: one ``encode_batch`` call per
request, off the event loop) and calls ``embed``, which queues one item per input and
awaits a future. The scheduler task on the event loop takes queued items oldest first,
packs them into one ``Batch`` under ``max_batch_tokens`` / ``max_batch_size`` (items of
several requests share a forward) and hands the forward to the model thread; it applies
each item's own ``normalize`` / ``dimensions`` and resolves a request's future once all its
inputs are done. While a forward runs, new items queue up and go into the next one. The
offline ``Engine`` is batch-invariant, so a vector served here equals ``Engine.embed`` on
the same input whatever it was packed with. A cancelled ``embed`` (client gone) drops its
queued items; a failed forward fails only the requests with an input in it.

Generation: a handler is admitted the same way (one input per prompt), tokenizes its
prompts in a tokenizer thread (``tokenize_prompts``) and calls ``generate``, which posts
one "add" message per prompt to the model thread and returns a ``GenerationStream``. The
model thread creates the ``GenerationEngine`` on the first message (an embedding-only
server never allocates a KV pool), adds the requests, steps, and hands each step's token
deltas back to the event loop with ``loop.call_soon_threadsafe``; they land in the
stream's asyncio queue. Closing a stream before it finished (client gone) posts an
"abort", which frees the request's KV pages. A failed generation step fails the requests
that were in the engine then, and the next request works.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from slipstream.engine.batch import Batch, Phase
from slipstream.engine.engine import Engine
from slipstream.errors import InputError
from slipstream.layers.pooler import postprocess
from slipstream.sampling import SamplingParams
from slipstream.server.metrics import ServerMetrics
from slipstream.server.worker import ModelWorker

if TYPE_CHECKING:
    from slipstream.engine.gen_request import GenerationOutput, StepOutput
    from slipstream.engine.generation import GenerationEngine

logger = logging.getLogger("slipstream.server")

T = TypeVar("T")


class Overloaded(Exception):
    """Admitting the request would put more inputs in flight than the limit (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is draining or stopped and takes no new work (HTTP 503)."""


class ForwardError(Exception):
    """The forward pass holding one of the request's inputs raised (HTTP 500)."""


class GenerationUnavailable(Exception):
    """The generation machinery (KV pool, scheduler) could not be created (HTTP 500)."""


@dataclass(eq=False, slots=True)
class _Request:
    future: asyncio.Future[np.ndarray]
    normalize: bool
    dimensions: int | None
    results: np.ndarray  # [N, D] float32, filled as forwards finish
    remaining: int  # inputs not yet embedded
    queued: int  # inputs still in the queue (not yet picked for a forward)
    enqueued_at: float
    cancelled: bool = False


@dataclass(slots=True)
class _Item:
    req: _Request
    index: int  # position in the request's input list
    tokens: list[int]


@dataclass(slots=True)
class _Stats:
    forwards: int = 0
    forwards_failed: int = 0
    # forwards whose inputs came from more than one request
    multi_request_forwards: int = 0
    dropped_inputs: int = field(default=0)
    # generation (gen_requests counts prompts; the others are written by the model thread)
    gen_requests: int = 0
    gen_steps: int = 0
    gen_step_failures: int = 0
    gen_aborted: int = 0  # requests aborted in the engine (client gone, or shutdown)


class Admission:
    """Inputs counted in flight until ``release`` (idempotent)."""

    __slots__ = ("_owner", "_n")

    def __init__(self, owner: AsyncEngine, n: int) -> None:
        self._owner = owner
        self._n = n

    def release(self) -> None:
        if self._n:
            self._owner._in_flight -= self._n
            self._n = 0


# ---------------------------------------------------------------------- generation
@dataclass(frozen=True, slots=True)
class GenDelta:
    """What one generation step produced for one prompt of a request."""

    index: int  # the prompt's position in the request
    token_ids: list[int]  # new tokens (one per step)
    text: str  # new text (may be empty: held back until decided, or incomplete UTF-8)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" when finished
    output: GenerationOutput | None = None  # the whole result when finished


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    # max_new_tokens was a default: lower it to what the KV pool holds for this prompt
    fit_to_cache: bool


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(eq=False, slots=True)
class _GenSeq:
    stream: GenerationStream
    index: int
    submitted: float
    last: float | None = None  # when the last delta arrived


class GenerationStream:
    """The generations of one HTTP request (one per prompt), as an async iterator of
    ``GenDelta`` in arrival order; it ends when every prompt has finished. A failure of any
    prompt raises from the iteration and aborts the others. ``close()`` aborts whatever is
    unfinished (call it when the client goes away); it is idempotent."""

    def __init__(self, owner: AsyncEngine, request_ids: list[str], prompt_lens: list[int]):
        self.request_ids = request_ids
        self.prompt_lens = prompt_lens
        self._owner = owner
        self._queue: asyncio.Queue[GenDelta | _Failed] = asyncio.Queue()
        self._unfinished = len(request_ids)
        self._peeked: GenDelta | None = None
        self._closed = False

    async def first(self) -> GenDelta:
        """Wait for the first delta (or the first error) without consuming it."""
        if self._peeked is None:
            self._peeked = await self._next()
        return self._peeked

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenDelta:
        if self._peeked is not None:
            delta, self._peeked = self._peeked, None
            return delta
        if self._unfinished == 0:
            raise StopAsyncIteration
        return await self._next()

    async def _next(self) -> GenDelta:
        item = await self._queue.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        if item.finished:
            self._unfinished -= 1
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._close_stream(self)

    def _push(self, item: GenDelta | _Failed) -> None:
        self._queue.put_nowait(item)


# ---------------------------------------------------------------------- the engine
class AsyncEngine:
    """Asyncio front of an ``Engine``. Public methods run on the event loop; the model runs
    on the ``ModelWorker`` thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_concurrent_inputs: int | None = None,
        tokenizer_threads: int = 1,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_tokens = engine.config.max_batch_tokens
        self.max_batch_size = engine.config.max_batch_size
        self.max_concurrent_inputs = max_concurrent_inputs
        self.metrics = metrics
        self.stats = _Stats()
        self._tokenizer_threads = tokenizer_threads
        self._pending: deque[_Item] = deque()
        self._queued = 0  # live (not cancelled) items in _pending
        self._running = 0  # items in the forward now running
        self._in_flight = 0  # admitted inputs not yet answered
        self._healthy = False
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._worker: ModelWorker | None = None
        self._token_pool: ThreadPoolExecutor | None = None
        # generation: loop side
        self._gen_seqs: dict[str, _GenSeq] = {}
        self._gen_ids = 0
        # Request ids stay unique even if another AsyncEngine drove this Engine before.
        self._gen_prefix = f"srv-{random.getrandbits(32):08x}"
        # generation: model-thread side
        self._gen: GenerationEngine | None = None
        # generation tokenizer (tokenizer threads), loaded on first use
        self._gen_tok: Any | None = None
        self._gen_tok_loaded = False
        self._gen_tok_lock = threading.Lock()
        if metrics is not None:
            metrics.bind_gauges(
                lambda: self._queued, lambda: self._running, lambda: self._in_flight
            )
            metrics.bind_generation_gauge(lambda: len(self._gen_seqs))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the model thread and the embedding scheduler on the running event loop."""
        if self._task is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._worker = ModelWorker(
            self._gen_tick, self._gen_busy, self._gen_exit, device=self.engine.config.device
        )
        self._token_pool = ThreadPoolExecutor(
            self._tokenizer_threads, thread_name_prefix="slipstream-tokenize"
        )
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="slipstream-scheduler")

    async def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, finish queued and running inputs and generations (up to
        ``timeout`` s), then stop; what is left fails with EngineStopped."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while (self._queued or self._running or self._gen_seqs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._queued or self._running or self._gen_seqs:
            logger.warning(
                "shutdown timeout: %d queued and %d running inputs, %d generations abandoned",
                self._queued,
                self._running,
                len(self._gen_seqs),
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        stopped = EngineStopped("the server is shutting down")
        while self._pending:
            item = self._pending.popleft()
            if not item.req.future.done():
                item.req.future.set_exception(stopped)
        self._queued = 0
        seqs, self._gen_seqs = self._gen_seqs, {}
        for seq in seqs.values():
            seq.stream._push(_Failed(stopped))
        # The worker aborts its generation requests (freeing their pages) when it exits.
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        if self._token_pool is not None:
            self._token_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """True once a forward has succeeded (and the engine still accepts work)."""
        return self._healthy and self._accepting

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def generations(self) -> int:
        """Generation requests (prompts) submitted and not yet finished or aborted."""
        return len(self._gen_seqs)

    # ------------------------------------------------------------------ admission
    def reserve(self, num_inputs: int) -> Admission:
        """Count ``num_inputs`` in flight until the admission is released (429 / 503)."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        limit = self.max_concurrent_inputs
        if limit is not None and self._in_flight + num_inputs > limit:
            raise Overloaded(
                f"{self._in_flight} inputs are in flight and this request adds {num_inputs}; "
                f"the limit is {limit} (--max-concurrent-requests): retry later"
            )
        self._in_flight += num_inputs
        return Admission(self, num_inputs)

    @contextlib.contextmanager
    def admit(self, num_inputs: int) -> Iterator[None]:
        """Count ``num_inputs`` in flight for the block; raise Overloaded if over the limit."""
        admission = self.reserve(num_inputs)
        try:
            yield
        finally:
            admission.release()

    # ------------------------------------------------------------------ embedding
    async def tokenize(
        self, inputs: Any, *, prompt_name: str | None = None, truncate: bool = True
    ) -> list[list[int]]:
        """Validate and tokenize in the tokenizer thread(s). Raises InputError."""
        t0 = time.perf_counter()
        seqs = await self._in_thread(
            self._token_pool, functools.partial(self._tokenize_sync, inputs, prompt_name, truncate)
        )
        if self.metrics is not None:
            self.metrics.tokenization_time.observe(time.perf_counter() - t0)
        return seqs

    def _tokenize_sync(
        self, inputs: Any, prompt_name: str | None, truncate: bool
    ) -> list[list[int]]:
        items = inputs if isinstance(inputs, list) else [inputs]
        for i, item in enumerate(items):
            if isinstance(item, str):
                _check_unicode(item, f"input {i}", "input")
        return self.engine.tokenize(inputs, prompt_name=prompt_name, truncate=truncate)

    async def embed(
        self, seqs: list[list[int]], *, normalize: bool = True, dimensions: int | None = None
    ) -> np.ndarray:
        """Embed validated token-id lists: float32 [N, D] in input order."""
        if not self._accepting or self._loop is None or self._wakeup is None:
            raise EngineStopped("the server is shutting down")
        self.engine.check_dimensions(dimensions)
        dim = self.engine.hidden_size if dimensions is None else int(dimensions)
        if not seqs:
            return np.empty((0, dim), dtype=np.float32)
        req = _Request(
            future=self._loop.create_future(),
            normalize=normalize,
            dimensions=None if dimensions is None else int(dimensions),
            results=np.empty((len(seqs), dim), dtype=np.float32),
            remaining=len(seqs),
            queued=len(seqs),
            enqueued_at=time.perf_counter(),
        )
        self._pending.extend(_Item(req, i, s) for i, s in enumerate(seqs))
        self._queued += len(seqs)
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._drop(req)
            raise

    async def run_on_model_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, between forwards (warm-up, tests, maintenance)."""
        return await self._in_thread(self._worker, fn)

    async def run_in_tokenizer_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a tokenizer thread (CPU-bound request preparation)."""
        return await self._in_thread(self._token_pool, fn)

    async def _in_thread(self, pool: Executor | None, fn: Callable[[], T]) -> T:
        if pool is None or self._loop is None:
            raise EngineStopped("the engine is not running")
        try:
            fut = pool.submit(fn)
        except RuntimeError:  # shut down
            raise EngineStopped("the engine is not running") from None
        return await asyncio.wrap_future(fut, loop=self._loop)

    def _drop(self, req: _Request) -> None:
        """Forget a request's queued items (they are skipped when the loop reaches them)."""
        if not req.cancelled:
            req.cancelled = True
            self._queued -= req.queued
            self.stats.dropped_inputs += req.queued
            req.queued = 0

    # ------------------------------------------------------------------ scheduler loop
    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            while self._queued == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
            items = self._pick()
            if not items:
                continue
            try:
                await self._step(items)
            except asyncio.CancelledError:
                self._fail(items, EngineStopped("the server is shutting down"))
                raise
            except EngineStopped as e:
                self._fail(items, e)
            except Exception as e:  # the loop must never die
                logger.exception("scheduler step failed")
                self._fail(items, ForwardError(f"internal error: {type(e).__name__}"))

    def _pick(self) -> list[_Item]:
        """Oldest queued items first, up to the token and size budgets (at least one)."""
        picked: list[_Item] = []
        tokens = 0
        pending = self._pending
        while pending:
            item = pending[0]
            if item.req.cancelled:
                pending.popleft()
                continue
            n = len(item.tokens)
            if picked and (
                tokens + n > self.max_batch_tokens or len(picked) >= self.max_batch_size
            ):
                break
            pending.popleft()
            item.req.queued -= 1
            self._queued -= 1
            picked.append(item)
            tokens += n
        return picked

    async def _step(self, items: list[_Item]) -> None:
        batch = Batch.pack([it.tokens for it in items], list(range(len(items))), Phase.EMBED)
        options = [(it.req.normalize, it.req.dimensions) for it in items]
        num_requests = len({id(it.req) for it in items})
        now = time.perf_counter()
        m = self.metrics
        if m is not None:
            for it in items:
                m.queue_time.observe(now - it.req.enqueued_at)
            m.batch_tokens.observe(batch.num_tokens)
            m.batch_size.observe(batch.num_seqs)
            m.batch_requests.observe(num_requests)
        self._running = len(items)
        try:
            rows, seconds = await self._in_thread(
                self._worker, functools.partial(self._forward, batch, options)
            )
        except (asyncio.CancelledError, EngineStopped):
            raise
        except Exception as e:
            self.stats.forwards_failed += 1
            if m is not None:
                m.forward_failures.inc()
            logger.error(
                "forward of %d inputs (%d tokens) failed",
                batch.num_seqs,
                batch.num_tokens,
                exc_info=e,
            )
            self._fail(items, ForwardError(f"the forward pass failed: {type(e).__name__}"))
            return
        finally:
            self._running = 0
        self._healthy = True
        self.stats.forwards += 1
        if num_requests > 1:
            self.stats.multi_request_forwards += 1
        if m is not None:
            m.inference_time.observe(seconds)
        for it, row in zip(items, rows, strict=True):
            req = it.req
            if req.future.done():  # cancelled by its client, or failed in another forward
                continue
            req.results[it.index] = row
            req.remaining -= 1
            if req.remaining == 0:
                req.future.set_result(req.results)

    def _forward(
        self, batch: Batch, options: list[tuple[bool, int | None]]
    ) -> tuple[list[np.ndarray], float]:
        """On the model thread: pooled vectors, then each item's own post-processing."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            pooled = self.engine.runner.embed(batch)  # [B, H] float32
            groups: dict[tuple[bool, int | None], list[int]] = {}
            for j, opt in enumerate(options):
                groups.setdefault(opt, []).append(j)
            rows: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(options)
            for (normalize, dimensions), idx in groups.items():
                sel = pooled
                if len(idx) != len(options):
                    sel = pooled.index_select(0, torch.tensor(idx, device=pooled.device))
                out = postprocess(sel, normalize, dimensions).cpu().numpy()
                for k, j in enumerate(idx):
                    rows[j] = out[k]
        return rows, time.perf_counter() - t0

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        for it in items:
            req = it.req
            if not req.future.done():
                req.future.set_exception(exc)
            self._drop(req)

    # ------------------------------------------------------------------ generation (loop)
    def generation_tokenizer(self) -> Any | None:
        """The tokenizer generation prompts are encoded with (no special tokens added, no
        truncation), loaded on first use; None if the model has no tokenizer.json."""
        with self._gen_tok_lock:
            if not self._gen_tok_loaded:
                from slipstream.engine.generation import load_generation_tokenizer

                self._gen_tok = load_generation_tokenizer(self.engine.model_dir)
                self._gen_tok_loaded = True
            return self._gen_tok

    async def tokenize_prompts(self, prompts: Sequence[str | list[int]]) -> list[list[int]]:
        """Validate and encode generation prompts in a tokenizer thread. Raises InputError."""
        t0 = time.perf_counter()
        seqs = await self._in_thread(
            self._token_pool, functools.partial(self._tokenize_prompts_sync, list(prompts))
        )
        if self.metrics is not None:
            self.metrics.tokenization_time.observe(time.perf_counter() - t0)
        return seqs

    def _tokenize_prompts_sync(self, prompts: list[str | list[int]]) -> list[list[int]]:
        vocab = self.engine.model_config.vocab_size
        out: list[list[int]] = []
        texts: list[tuple[int, str]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if p == "":
                    raise InputError(f"prompt {i} is an empty string", param="prompt")
                _check_unicode(p, f"prompt {i}", "prompt")
                texts.append((i, p))
                out.append([])
                continue
            if not p:
                raise InputError(f"prompt {i} is an empty token list", param="prompt")
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise InputError(
                    f"prompt {i}: token id {bad} is outside [0, {vocab}) (the model's vocabulary)",
                    param="prompt",
                )
            out.append(list(p))
        if texts:
            for (i, _), ids in zip(
                texts, self.encode_texts([t for _, t in texts], "prompt"), strict=True
            ):
                if not ids:
                    raise InputError(f"prompt {i} tokenizes to no tokens", param="prompt")
                out[i] = ids
        return out

    def encode_texts(self, texts: list[str], param: str) -> list[list[int]]:
        """Generation-style encoding (in the calling thread): no special tokens added."""
        tok = self.generation_tokenizer()
        if tok is None:
            raise InputError(
                f"the model in {self.engine.model_dir} has no tokenizer.json: give token ids",
                param=param,
            )
        return [list(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        fit_to_cache: bool = False,
    ) -> GenerationStream:
        """Start generating for validated prompts (one ``SamplingParams``, or one per
        prompt). ``fit_to_cache``: ``max_new_tokens`` was not asked for; lower it to what the
        KV pool can hold for the prompt. Errors (a prompt the engine rejects, a failed step)
        come out of the stream's iteration."""
        if not self._accepting or self._worker is None or self._loop is None:
            raise EngineStopped("the server is shutting down")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        self._gen_ids += 1
        base = f"{self._gen_prefix}-{self._gen_ids}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        stream = GenerationStream(self, rids, [len(p) for p in prompts])
        now = time.perf_counter()
        for i, rid in enumerate(rids):
            self._gen_seqs[rid] = _GenSeq(stream, i, now)
        try:
            self._worker.post(
                *[
                    _Add(rid, p, sp, fit_to_cache)
                    for rid, p, sp in zip(rids, prompts, params, strict=True)
                ]
            )
        except RuntimeError:
            for rid in rids:
                self._gen_seqs.pop(rid, None)
            raise EngineStopped("the server is shutting down") from None
        self.stats.gen_requests += len(prompts)
        if self.metrics is not None:
            self.metrics.gen_prompt_tokens.inc(sum(len(p) for p in prompts))
        return stream

    def _close_stream(self, stream: GenerationStream) -> None:
        """Abort the stream's unfinished requests (their KV pages are freed)."""
        aborts = []
        for rid in stream.request_ids:
            if self._gen_seqs.pop(rid, None) is not None:
                aborts.append(_Abort(rid))
        if not aborts:
            return
        if self.metrics is not None:
            self.metrics.gen_finished.labels(finish_reason="abort").inc(len(aborts))
        if self._worker is not None and not self._worker.closed:
            with contextlib.suppress(RuntimeError):  # shut down meanwhile: it aborts all
                self._worker.post(*aborts)

    def _deliver(
        self, events: list[tuple[str, StepOutput | BaseException]], seconds: float | None
    ) -> None:
        """On the loop: one generation step's results, into the requests' streams."""
        m = self.metrics
        if seconds is not None:
            self._healthy = True
            if m is not None:
                m.gen_step_time.observe(seconds)
        now = time.perf_counter()
        for rid, ev in events:
            seq = self._gen_seqs.get(rid)
            if seq is None:  # closed by its client meanwhile, or the engine stopped
                continue
            if isinstance(ev, BaseException):
                del self._gen_seqs[rid]
                if m is not None:
                    m.gen_finished.labels(finish_reason="error").inc()
                seq.stream._push(_Failed(ev))
                continue
            n = len(ev.new_token_ids)
            if m is not None:
                if seq.last is None:
                    m.time_to_first_token.observe(now - seq.submitted)
                elif n:
                    m.inter_token_latency.observe((now - seq.last) / n)
                m.gen_tokens.inc(n)
            seq.last = now
            if ev.finished:
                del self._gen_seqs[rid]
                if m is not None:
                    m.gen_finished.labels(finish_reason=ev.finish_reason or "stop").inc()
            seq.stream._push(
                GenDelta(
                    seq.index,
                    list(ev.new_token_ids),
                    ev.new_text or "",
                    ev.finished,
                    ev.finish_reason,
                    ev.output,
                )
            )

    # ------------------------------------------------------------------ generation (model thread)
    def _gen_busy(self) -> bool:
        gen = self._gen
        return gen is not None and gen.has_unfinished()

    def _gen_tick(self, messages: list[Any]) -> None:
        """On the model thread: apply posted adds / aborts, then one generation step."""
        events: list[tuple[str, StepOutput | BaseException]] = []
        for msg in messages:
            if isinstance(msg, _Abort):
                if self._gen is not None and self._gen.abort(msg.request_id) is not None:
                    self.stats.gen_aborted += 1
            else:
                self._gen_add(msg, events)
        gen = self._gen
        seconds: float | None = None
        if gen is not None and gen.has_unfinished():
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    outs = gen.step()
            except Exception as e:
                self.stats.gen_step_failures += 1
                if self.metrics is not None:
                    self.metrics.forward_failures.inc()
                logger.error(
                    "generation step failed; failing its %d requests", len(gen.requests), exc_info=e
                )
                self._gen_abort_all(
                    events, ForwardError(f"the forward pass failed: {type(e).__name__}")
                )
            else:
                seconds = time.perf_counter() - t0
                self.stats.gen_steps += 1
                events.extend((o.request_id, o) for o in outs)
                if not outs and gen.has_unfinished() and not gen.scheduler.has_work():
                    logger.error("generation stalled with unfinished requests")
                    self._gen_abort_all(events, ForwardError("internal error: generation stalled"))
        if events or seconds is not None:
            self._to_loop(self._deliver, events, seconds)

    def _gen_add(self, msg: _Add, events: list[tuple[str, StepOutput | BaseException]]) -> None:
        gen = self._gen
        if gen is None:
            try:
                gen = self._gen = self.engine.generation_engine()
            except Exception as e:
                logger.error("cannot create the generation machinery", exc_info=e)
                events.append(
                    (msg.request_id, GenerationUnavailable(f"text generation is unavailable: {e}"))
                )
                return
        params = msg.params
        if msg.fit_to_cache:
            # The longest sequence caches prompt + max_new_tokens - 1 tokens.
            room = gen.allocator.num_usable * gen.pool.page_size + 1 - len(msg.prompt)
            if 1 <= room < params.max_new_tokens:
                params = dataclasses.replace(params, max_new_tokens=room)
        try:
            gen.add_request(msg.prompt, params, request_id=msg.request_id, detokenize=True)
        except InputError as e:
            events.append((msg.request_id, e))
        except Exception as e:
            logger.error("adding generation request %s failed", msg.request_id, exc_info=e)
            events.append((msg.request_id, ForwardError(f"internal error: {type(e).__name__}")))

    def _gen_abort_all(
        self, events: list[tuple[str, StepOutput | BaseException]], error: BaseException
    ) -> None:
        gen = self._gen
        if gen is None:
            return
        for rid in list(gen.requests):
            try:
                gen.abort(rid)
            except Exception:  # keep the worker from retrying a broken request forever
                logger.exception("aborting generation request %s failed; dropping it", rid)
                gen.requests.pop(rid, None)
            events.append((rid, error))

    def _gen_exit(self) -> None:
        """The worker stops: abort what is left so that the engine holds no KV pages."""
        gen = self._gen
        if gen is not None:
            for rid in list(gen.requests):
                if gen.abort(rid) is not None:
                    self.stats.gen_aborted += 1

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(fn, *args)

    def generation_stats(self) -> dict[str, Any]:
        """The generation engine's counters (read them on the model thread: see
        ``run_on_model_thread``); empty before the first generation request."""
        return {} if self._gen is None else self._gen.stats()


def _check_unicode(text: str, what: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can carry lone surrogates ("\ud800"), which no tokenizer accepts.
        raise InputError(
            f"{what} is not valid Unicode text (it holds a lone surrogate)", param=param
        ) from None
