"""ModelWorker: the one thread that runs the model.

Everything that touches the model (embedding forwards, generation steps, the lazy creation
of the generation machinery, maintenance calls) runs on this thread, so the model, the KV
pool and the ``GenerationEngine`` (which is not thread-safe) have a single owner.

Each turn of the loop runs at most one submitted job (an embedding forward picked by the
scheduler task on the event loop, or a ``run_on_model_thread`` call), in submission order,
and then calls ``tick`` with the messages posted since the last turn (new generation
requests, aborts). ``tick`` runs one generation step when requests are unfinished. Embedding
forwards and generation steps therefore alternate: neither starves the other.

The worker is a ``concurrent.futures.Executor`` so that the event loop awaits its jobs
with ``asyncio.wrap_future``. When there is nothing to do it sleeps on a condition
variable; ``submit`` and ``post`` wake it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

logger = logging.getLogger("slipstream.server")


class ModelWorker(Executor):
    """A single-thread executor that also drives a ``tick`` between jobs.

    ``tick(messages)`` and ``busy()`` are called on the worker thread only; ``busy`` is
    called with the worker's lock held and must be cheap (it says whether ``tick`` has
    work even without new messages, e.g. unfinished generation requests). ``on_exit``
    runs on the worker thread once the worker is shut down (after the job in progress).
    """

    def __init__(
        self,
        tick: Callable[[list[Any]], None],
        busy: Callable[[], bool],
        on_exit: Callable[[], None] | None = None,
        name: str = "slipstream-model",
        device: str | None = None,
    ) -> None:
        self._device = device
        self._tick = tick
        self._busy = busy
        self._on_exit = on_exit
        self._cv = threading.Condition()
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict]] = deque()
        self._inbox: list[Any] = []
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the model worker is shut down")
            self._jobs.append((fut, fn, args, kwargs))
            self._cv.notify()
        return fut

    def post(self, *messages: Any) -> None:
        """Hand messages to the next ``tick`` (in order) and wake the worker."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the model worker is shut down")
            self._inbox.extend(messages)
            self._cv.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the job in progress. Queued jobs are cancelled, posted messages dropped
        (``on_exit`` cleans up what they would have done)."""
        with self._cv:
            self._closed = True
            jobs = list(self._jobs)
            self._jobs.clear()
            self._inbox.clear()
            self._cv.notify()
        for fut, *_ in jobs:
            fut.cancel()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ worker thread
    def _main(self) -> None:
        if self._device is not None and self._device.startswith("cuda:"):
            # The current CUDA device is per thread: make this thread's the model's, so that
            # allocations and CUDA-graph capture land on cuda:N, not cuda:0.
            import torch

            torch.cuda.set_device(self._device)
        while True:
            with self._cv:
                while not (self._closed or self._jobs or self._inbox or self._busy()):
                    self._cv.wait()
                if self._closed:
                    break
                job = self._jobs.popleft() if self._jobs else None
                messages, self._inbox = self._inbox, []
            if job is not None:
                self._run_job(*job)
                job = None  # hold no reference to the job's arguments while idle
            try:
                self._tick(messages)
            except Exception:  # the worker must never die; tick reports its own errors
                logger.exception("model worker tick failed")
        if self._on_exit is not None:
            try:
                self._on_exit()
            except Exception:
                logger.exception("model worker clean-up failed")

    @staticmethod
    def _run_job(
        fut: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict
    ) -> None:
        if not fut.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the awaiting side)
            fut.set_exception(e)
        else:
            fut.set_result(result)
