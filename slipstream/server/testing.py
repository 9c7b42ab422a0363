"""``LiveServer``: a real slipstream server on loopback in a background thread.

For tests and scripts that want the real HTTP stack (uvicorn, sockets, the official
clients) without a subprocess::

    with LiveServer(engine, ServerSettings(api_key="k")) as live:
        httpx.post(f"{live.url}/embed", json={"inputs": "hi"}, headers=live.headers)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from slipstream.engine.engine import Engine
from slipstream.server.app import ServerContext, SlipstreamServer, make_server
from slipstream.server.metrics import ServerMetrics
from slipstream.server.settings import ServerSettings

T = TypeVar("T")


class LiveServer:
    def __init__(
        self,
        engine: Engine,
        settings: ServerSettings | None = None,
        *,
        startup_timeout: float = 60.0,
        wait_healthy: bool = True,
    ) -> None:
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.startup_timeout = startup_timeout
        self.wait_healthy = wait_healthy
        self.metrics = ServerMetrics()
        self.server: SlipstreamServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    @property
    def ctx(self) -> ServerContext:
        assert self.server is not None
        return self.server.ctx

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    def start(self) -> LiveServer:
        # Bind first (port 0: the OS picks a free port), then hand the socket to uvicorn.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.server = make_server(self.engine, self.settings, self.metrics)
        self._thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [sock]},
            name="slipstream-live-server",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not (
            self.server.started and (self.ctx.async_engine.healthy or not self.wait_healthy)
        ):
            if not self._thread.is_alive():
                raise RuntimeError("the live server thread died during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("the live server did not become healthy in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.request_exit()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's event loop and return its result."""
        loop = self.ctx.loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
