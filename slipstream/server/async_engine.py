"""AsyncEngine: one scheduler loop owns the model; HTTP handlers enqueue and await.

Request path: a handler is admitted (``admit``: the in-flight input count, 429 above the
limit), tokenizes its inputs in a thread (``tokenize``: one ``encode_batch`` call per
request, off the event loop) and calls ``embed``, which queues one item per input and
awaits a future. The scheduler loop (an asyncio task) takes queued items oldest first,
packs them into one ``Batch`` under ``max_batch_tokens`` / ``max_batch_size`` (items of
several requests share a forward), runs the forward on the single model thread, applies
each item's own ``normalize`` / ``dimensions`` and resolves a request's future once all its
inputs are done. While a forward runs, new items queue up and go into the next one.

The offline ``Engine`` is batch-invariant, so a vector served here equals
``Engine.embed`` on the same input whatever it was packed with.

A cancelled ``embed`` (client gone) drops its queued items; a failed forward fails only
the requests with an input in it (and drops their other queued items).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from slipstream.engine.batch import Batch, Phase
from slipstream.engine.engine import Engine
from slipstream.errors import InputError
from slipstream.layers.pooler import postprocess
from slipstream.server.metrics import ServerMetrics

logger = logging.getLogger("slipstream.server")

T = TypeVar("T")


class Overloaded(Exception):
    """Admitting the request would put more inputs in flight than the limit (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is draining or stopped and takes no new work (HTTP 503)."""


class ForwardError(Exception):
    """The forward pass holding one of the request's inputs raised (HTTP 500)."""


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


class AsyncEngine:
    """Asyncio front of an ``Engine``; every method but the model thread runs on the loop."""

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
        self._model_pool: ThreadPoolExecutor | None = None
        self._token_pool: ThreadPoolExecutor | None = None
        if metrics is not None:
            metrics.bind_gauges(
                lambda: self._queued, lambda: self._running, lambda: self._in_flight
            )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the scheduler loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-model")
        self._token_pool = ThreadPoolExecutor(
            self._tokenizer_threads, thread_name_prefix="slipstream-tokenize"
        )
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="slipstream-scheduler")

    async def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, finish queued and running inputs (up to ``timeout`` s), stop."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while (self._queued or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._queued or self._running:
            logger.warning(
                "shutdown timeout: %d queued and %d running inputs abandoned",
                self._queued,
                self._running,
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
        for pool in (self._model_pool, self._token_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

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

    # ------------------------------------------------------------------ admission
    @contextlib.contextmanager
    def admit(self, num_inputs: int) -> Iterator[None]:
        """Count ``num_inputs`` in flight for the block; raise Overloaded if over the limit."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        limit = self.max_concurrent_inputs
        if limit is not None and self._in_flight + num_inputs > limit:
            raise Overloaded(
                f"{self._in_flight} inputs are in flight and this request adds {num_inputs}; "
                f"the limit is {limit} (--max-concurrent-requests): retry later"
            )
        self._in_flight += num_inputs
        try:
            yield
        finally:
            self._in_flight -= num_inputs

    # ------------------------------------------------------------------ work
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
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    # JSON can carry lone surrogates ("\ud800"), which no tokenizer accepts.
                    raise InputError(
                        f"input {i} is not valid Unicode text (it holds a lone surrogate)",
                        param="input",
                    ) from None
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
        return await self._in_thread(self._model_pool, fn)

    async def _in_thread(self, pool: ThreadPoolExecutor | None, fn: Callable[[], T]) -> T:
        if pool is None or self._loop is None:
            raise EngineStopped("the engine is not running")
        return await self._loop.run_in_executor(pool, fn)

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
                self._model_pool, functools.partial(self._forward, batch, options)
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
