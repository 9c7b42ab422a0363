"""Server lifecycle: 503 until the first forward, and draining on SIGTERM / SIGINT.

The signal test runs the real command (``python -m slipstream serve``, default model) in
a subprocess, signals it while requests are in flight, and checks that they all complete
with 200 and that the process exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from slipstream import Engine  # noqa: E402
from slipstream.server.settings import ServerSettings  # noqa: E402
from slipstream.server.testing import LiveServer  # noqa: E402


def test_health_is_503_until_a_forward_succeeds(tiny_qwen3: Path) -> None:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32")
    gate = threading.Event()
    original = engine.runner.embed

    def gated(batch: Any) -> Any:
        gate.wait(30)
        return original(batch)

    engine.runner.embed = gated  # type: ignore[method-assign]  # this engine only
    with LiveServer(engine, ServerSettings(served_model_name="tiny"), wait_healthy=False) as live:
        r = httpx.get(f"{live.url}/health", timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_ready"
        gate.set()  # the warm-up forward may now run
        deadline = time.monotonic() + 30
        while httpx.get(f"{live.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(f"{live.url}/embed", json={"inputs": "after warm-up"}, timeout=30)
        assert r.status_code == 200


def _load_state(url: str) -> tuple[int, int]:
    """(inputs in flight, /v1/embeddings requests answered 200), from one scrape."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^slipstream_inputs_in_flight (\S+)$", text, re.M)
    done = re.search(
        r'^slipstream_requests_total\{endpoint="/v1/embeddings",status="200"\} (\S+)$', text, re.M
    )
    return int(float(m.group(1))) if m else 0, int(float(done.group(1))) if done else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests_then_exits_0(sig: signal.Signals) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "slipstream", "serve", "--port", "0", "--shutdown-timeout", "60"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    log: list[str] = []
    ready = threading.Event()
    draining = threading.Event()
    found: dict[str, str] = {}

    def read_log() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"ready on (http://[\d.]+:\d+):", line)
            if m:
                found["url"] = m.group(1)
                ready.set()
            if "draining:" in line:
                draining.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "".join(log)
        url = found["url"]
        ready_line = next(x for x in log if "ready on" in x)
        # one line when ready: address, model, device, dtype, backend
        for part in ("all-MiniLM-L6-v2", "device=cpu", "dtype=float32", "backend="):
            assert part in ready_line, ready_line

        words = "packed sequences stream through attention layers without padding".split()
        n_requests, per_request = 8, 2
        results: list[Any] = []

        clients = [httpx.Client(base_url=url, timeout=120) for _ in range(n_requests)]
        for c in clients:  # open the connections now, so that the requests go out together
            assert c.get("/health").status_code == 200
        barrier = threading.Barrier(n_requests)

        def worker(i: int) -> None:
            texts = [
                " ".join(words[(i + j) % len(words)] for j in range(100 + 7 * k))
                for k in range(per_request)
            ]
            barrier.wait()
            try:
                r = clients[i].post("/v1/embeddings", json={"input": texts})
                results.append(r.status_code)
            except Exception as e:  # noqa: BLE001 (recorded, asserted below)
                results.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_requests)]
        for t in threads:
            t.start()
        # Signal once every request is admitted (in flight or already answered) and some
        # are still in flight.
        deadline = time.monotonic() + 60
        while True:
            in_flight, answered = _load_state(url)
            if in_flight and in_flight == per_request * (n_requests - answered):
                break
            assert answered < n_requests, "every request finished before the signal"
            assert time.monotonic() < deadline, results
            time.sleep(0.005)
        proc.send_signal(sig)
        assert draining.wait(30), "".join(log)
        line = next(x for x in log if "draining:" in x)
        m = re.search(r"finishing (\d+) in-flight inputs", line)
        assert m and int(m.group(1)) >= 1, line  # work was in flight when the signal came
        # no longer accepting: refused, or 503 if a connection slipped in
        try:
            r = httpx.post(f"{url}/v1/embeddings", json={"input": "late"}, timeout=30)
            assert r.status_code == 503, r.text
        except httpx.TransportError:
            pass
        for t in threads:
            t.join(120)
        assert results == [200] * n_requests, "".join(log)
        assert proc.wait(60) == 0, "".join(log)
        for c in clients:
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    text = "".join(log)
    assert "slipstream server stopped" in text
    assert "Traceback" not in text
