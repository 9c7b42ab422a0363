"""The HTTP server against a live uvicorn on loopback (one per module), with real clients.

Served model: the packaged all-MiniLM-L6-v2; every vector is compared with the offline
``Engine.embed`` on the same inputs (max abs difference <= 1e-5, fp32).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from slipstream import Engine

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from slipstream.server.settings import ServerSettings  # noqa: E402
from slipstream.server.testing import LiveServer  # noqa: E402

KEY = "test-key-123"
NAME = "all-MiniLM-L6-v2"
MAX_CLIENT_BATCH = 64
MAX_IN_FLIGHT = 256
PAYLOAD_LIMIT = 200_000
ATOL = 1e-5

WORDS = (
    "the quick brown fox jumps over a lazy dog while packed sequences stream through "
    "attention layers without padding and every vector lands back in input order"
).split()


def _text(rng: np.random.Generator, max_words: int = 120) -> str:
    n = int(rng.integers(1, max_words + 1))
    return " ".join(rng.choice(WORDS, size=n).tolist())


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    engine = Engine(device="cpu", dtype="float32")
    settings = ServerSettings(
        served_model_name=NAME,
        api_key=KEY,
        max_client_batch_size=MAX_CLIENT_BATCH,
        max_concurrent_requests=MAX_IN_FLIGHT,
        payload_limit=PAYLOAD_LIMIT,
        shutdown_timeout=5,
    )
    with LiveServer(engine, settings) as server:
        yield server


@pytest.fixture()
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
        yield c


@pytest.fixture()
def offline(minilm_engine: Engine) -> Engine:
    return minilm_engine


def _assert_healthy(live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/health", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok"}


def _assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _metric(live: LiveServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = m.group(2) or ""
        if all(f'{k}="{v}"' in got for k, v in labels.items()) or not want:
            total += float(m.group(3))
    return total


@contextlib.contextmanager
def model_thread_blocked(live: LiveServer) -> Iterator[None]:
    """Hold the model thread so that requests stay in flight until the block exits."""
    gate, entered = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(60)

    ctx = live.ctx
    assert ctx.loop is not None
    fut = asyncio.run_coroutine_threadsafe(ctx.async_engine.run_on_model_thread(block), ctx.loop)
    assert entered.wait(10)
    try:
        yield
    finally:
        gate.set()
        fut.result(10)


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- OpenAI client
def _vectors(data: list[Any]) -> np.ndarray:
    """The rows of an OpenAI response; explicit base64 comes back as the raw string."""
    rows = [d.embedding for d in data]
    if isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), "<f4") for r in rows])
    return np.asarray(rows, dtype=np.float32)


def test_openai_client_float_base64_dimensions(live: LiveServer, offline: Engine) -> None:
    from openai import OpenAI

    oa = OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    texts = [
        "A man is eating food.",
        "The girl is carrying a baby.",
        "x",
        "slipstream packs sequences end to end " * 8,
    ]
    ref = offline.embed(texts)

    one = oa.embeddings.create(model=NAME, input=texts[0], encoding_format="float")
    assert one.model == NAME and len(one.data) == 1 and one.data[0].index == 0
    assert np.abs(np.asarray(one.data[0].embedding, np.float32) - ref[0]).max() <= ATOL
    n_tokens = len(offline.tokenize(texts[0])[0])
    assert one.usage.prompt_tokens == one.usage.total_tokens == n_tokens

    for fmt in ("float", "base64"):
        res = oa.embeddings.create(model=NAME, input=texts, encoding_format=fmt)
        got = _vectors(res.data)
        assert isinstance(res.data[0].embedding, str if fmt == "base64" else list)
        assert [d.index for d in res.data] == list(range(len(texts)))
        assert np.abs(got - ref).max() <= ATOL, fmt
        assert res.usage.prompt_tokens == sum(len(s) for s in offline.tokenize(texts))

    # the client's default is base64, decoded by the client itself
    res = oa.embeddings.create(model=NAME, input=texts)
    assert isinstance(res.data[0].embedding, list)
    assert np.abs(_vectors(res.data) - ref).max() <= ATOL

    ref64 = offline.embed(texts, dimensions=64)
    for fmt in ("float", "base64"):
        res = oa.embeddings.create(model=NAME, input=texts, encoding_format=fmt, dimensions=64)
        got = _vectors(res.data)
        assert got.shape == (len(texts), 64)
        assert np.abs(got - ref64).max() <= ATOL
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    ids = offline.tokenize(texts[:2])
    res = oa.embeddings.create(model=NAME, input=ids, encoding_format="float")
    got = np.asarray([d.embedding for d in res.data], dtype=np.float32)
    assert np.abs(got - ref[:2]).max() <= ATOL
    res = oa.embeddings.create(model=NAME, input=ids[0], encoding_format="float")
    assert np.abs(np.asarray(res.data[0].embedding, np.float32) - ref[0]).max() <= ATOL
    _assert_healthy(live)


def test_base64_is_little_endian_float32(client: httpx.Client, offline: Engine) -> None:
    r = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vec = np.frombuffer(raw, dtype="<f4")
    assert np.abs(vec - offline.embed("hello")[0]).max() <= ATOL


def test_models_health_metrics_open(live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/v1/models", headers=live.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [(d["id"], d["object"], d["owned_by"]) for d in body["data"]] == [
        (NAME, "model", "slipstream")
    ]
    assert isinstance(body["data"][0]["created"], int)
    _assert_healthy(live)  # no key needed
    r = httpx.get(f"{live.url}/metrics")
    assert r.status_code == 200 and "slipstream_queue_size" in r.text


# ---------------------------------------------------------------------------- TEI routes
def test_embed_and_tokenize_routes(client: httpx.Client, offline: Engine) -> None:
    texts = ["first input", "a second, longer input with more words"]
    r = client.post("/embed", json={"inputs": texts})
    assert r.status_code == 200, r.text
    assert np.abs(np.asarray(r.json(), np.float32) - offline.embed(texts)).max() <= ATOL

    r = client.post("/embed", json={"inputs": texts[0], "normalize": False, "dimensions": 16})
    ref = offline.embed(texts[0], normalize=False, dimensions=16)
    assert np.abs(np.asarray(r.json(), np.float32) - ref).max() <= ATOL

    long_text = "word " * 400  # over MiniLM's 256 tokens
    r = client.post("/embed", json={"inputs": long_text, "truncate": True})
    assert r.status_code == 200, r.text
    ref = offline.embed(long_text, truncate=True)
    assert np.abs(np.asarray(r.json(), np.float32) - ref).max() <= ATOL
    _assert_error(client.post("/embed", json={"inputs": long_text}), 400, param="inputs")
    _assert_error(
        client.post("/embed", json={"inputs": "a", "prompt_name": "query"}),
        400,
        param="prompt_name",
    )

    r = client.post("/tokenize", json={"inputs": texts})
    assert r.status_code == 200, r.text
    toks = r.json()
    assert [[t["id"] for t in s] for s in toks] == offline.tokenize(texts)
    assert toks[0][0]["text"] == "[CLS]"
    _assert_error(client.post("/tokenize", json={"inputs": ""}), 400, param="inputs")


# ---------------------------------------------------------------------------- concurrency
def test_concurrent_clients_match_offline_and_share_batches(
    live: LiveServer, offline: Engine
) -> None:
    rng = np.random.default_rng(7)
    requests = [[_text(rng) for _ in range(1 + i % 5)] for i in range(32)]
    flat = [t for req in requests for t in req]
    ref = offline.embed(flat)
    offsets = np.cumsum([0] + [len(r) for r in requests])
    results: dict[int, Any] = {}
    ae = live.ctx.async_engine
    multi_before = ae.stats.multi_request_forwards
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        with httpx.Client(base_url=live.url, headers=live.headers, timeout=120) as c:
            barrier.wait()
            fmt = "base64" if i % 2 else "float"
            r = c.post(
                "/v1/embeddings", json={"input": requests[i], "model": NAME, "encoding_format": fmt}
            )
            results[i] = (r.status_code, r.json(), fmt)

    # Hold the model while the 32 requests arrive so that the queue holds all of them;
    # the forwards after the release each pack inputs of many requests.
    with model_thread_blocked(live):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        _wait_for(lambda: ae.in_flight == len(flat) and ae.queued + ae.running == len(flat))
    for t in threads:
        t.join(120)
    assert len(results) == len(requests)
    for i, (status, body, fmt) in results.items():
        assert status == 200, body
        rows = [d["embedding"] for d in body["data"]]
        if fmt == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(x), "<f4") for x in rows])
        else:
            got = np.asarray(rows, np.float32)
        assert np.abs(got - ref[offsets[i] : offsets[i + 1]]).max() <= ATOL, i

    assert ae.stats.multi_request_forwards > multi_before
    # the metrics show it too: some forward held inputs of more than one request
    count = _metric(live, "slipstream_batch_requests_count")
    single = _metric(live, "slipstream_batch_requests_bucket", le="1.0")
    assert count > single
    assert _metric(live, "slipstream_prompt_tokens_total") > 0
    _assert_healthy(live)


def test_unblocked_concurrency(live: LiveServer, offline: Engine) -> None:
    """No artificial hold: 16 clients with mixed lengths, answers equal the offline ones."""
    rng = np.random.default_rng(11)
    texts = [_text(rng, 60) for _ in range(16)]
    ref = offline.embed(texts)
    out: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        r = httpx.post(
            f"{live.url}/embed", json={"inputs": [texts[i]]}, headers=live.headers, timeout=60
        )
        assert r.status_code == 200, r.text
        out[i] = np.asarray(r.json()[0], np.float32)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == len(texts)
    for i in range(len(texts)):
        assert np.abs(out[i] - ref[i]).max() <= ATOL


# ---------------------------------------------------------------------------- errors
BAD_BODIES: list[tuple[str, Any, int, str | None, str | None]] = [
    # (id, json body, status, param, code)
    ("empty-list", {"input": []}, 400, "input", None),
    ("empty-string", {"input": ""}, 400, "input", None),
    ("empty-string-in-list", {"input": ["ok", ""]}, 400, "input", None),
    ("empty-token-list", {"input": [[]]}, 400, "input", None),
    ("token-id-too-big", {"input": [[101, 30522, 102]]}, 400, "input", None),
    ("token-id-negative", {"input": [-1, 5]}, 400, "input", None),
    ("too-long-text", {"input": "word " * 400}, 400, "input", None),
    ("too-long-ids", {"input": [[101] * 300]}, 400, "input", None),
    ("dimensions-zero", {"input": "a", "dimensions": 0}, 400, "dimensions", None),
    ("dimensions-too-big", {"input": "a", "dimensions": 385}, 400, "dimensions", None),
    ("dimensions-string", {"input": "a", "dimensions": "8"}, 400, "dimensions", None),
    ("dimensions-float", {"input": "a", "dimensions": 1.5}, 400, "dimensions", None),
    ("encoding-format", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format", None),
    ("input-int", {"input": 5}, 400, "input", None),
    ("input-object", {"input": {"a": 1}}, 400, "input", None),
    ("input-mixed", {"input": [1, "a"]}, 400, "input", None),
    ("input-bool-ids", {"input": [True, False]}, 400, "input", None),
    ("input-missing", {"model": NAME}, 400, "input", None),
    ("model-type", {"input": "a", "model": 5}, 400, "model", None),
    ("body-not-object", ["a"], 400, None, None),
    ("unknown-model", {"input": "a", "model": "gpt-nope"}, 404, "model", "model_not_found"),
    ("too-many-inputs", {"input": ["a"] * (MAX_CLIENT_BATCH + 1)}, 413, "input", "too_many_inputs"),
]


@pytest.mark.parametrize(
    "body,status,param,code", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_error_cases(
    live: LiveServer,
    client: httpx.Client,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    failures = _metric(live, "slipstream_request_failures_total")
    _assert_error(client.post("/v1/embeddings", json=body), status, param, code)
    assert _metric(live, "slipstream_request_failures_total") == failures + 1
    _assert_healthy(live)


def test_malformed_json_and_payload_limit(live: LiveServer, client: httpx.Client) -> None:
    hdr = {"Content-Type": "application/json"}
    err = _assert_error(
        client.post("/v1/embeddings", content=b'{"input": "a",', headers=hdr),
        400,
        code="invalid_json",
    )
    assert "JSON" in err["message"]
    _assert_error(client.post("/v1/embeddings", content=b"", headers=hdr), 400)
    # over the payload limit, with Content-Length ...
    big = b'{"input": "' + b"a" * PAYLOAD_LIMIT + b'"}'
    _assert_error(
        client.post("/v1/embeddings", content=big, headers=hdr), 413, code="payload_too_large"
    )

    # ... and chunked (no Content-Length): counted as it arrives
    def chunks() -> Iterator[bytes]:
        yield b'{"input": "'
        for _ in range(PAYLOAD_LIMIT // 10_000 + 1):
            yield b"a" * 10_000
        yield b'"}'

    _assert_error(
        client.post("/v1/embeddings", content=chunks(), headers=hdr), 413, code="payload_too_large"
    )
    _assert_healthy(live)


def test_auth(live: LiveServer) -> None:
    url = f"{live.url}/v1/embeddings"
    body = {"input": "a"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        r = httpx.post(url, json=body, headers=headers)
        _assert_error(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/embed", "/tokenize", "/openapi.json", "/nope"):
        assert httpx.post(f"{live.url}{path}", json={}).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{live.url}/metrics").status_code == 200
    _assert_healthy(live)


def test_unknown_route_and_method(client: httpx.Client, live: LiveServer) -> None:
    _assert_error(client.get("/v2/nothing"), 404, code="not_found")
    r = client.get("/v1/embeddings")
    _assert_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers["allow"]
    _assert_healthy(live)


def test_429_when_too_many_inputs_in_flight(live: LiveServer) -> None:
    ae = live.ctx.async_engine
    statuses: list[int] = []

    def worker() -> None:
        r = httpx.post(
            f"{live.url}/embed",
            json={"inputs": ["x y z"] * MAX_CLIENT_BATCH},
            headers=live.headers,
            timeout=60,
        )
        statuses.append(r.status_code)

    n = MAX_IN_FLIGHT // MAX_CLIENT_BATCH
    with model_thread_blocked(live):
        threads = [threading.Thread(target=worker) for _ in range(n)]
        for t in threads:
            t.start()
        _wait_for(lambda: ae.in_flight == MAX_IN_FLIGHT)
        r = httpx.post(f"{live.url}/embed", json={"inputs": "one more"}, headers=live.headers)
        _assert_error(r, 429, code="too_many_inputs_in_flight")
        assert r.headers["retry-after"] == "1"
    for t in threads:
        t.join(60)
    assert statuses == [200] * n
    assert ae.in_flight == 0
    _assert_healthy(live)


def test_503_while_draining(live: LiveServer, client: httpx.Client) -> None:
    ctx = live.ctx
    ctx.draining = True  # what SIGTERM sets (the subprocess test covers the real signal)
    try:
        _assert_error(client.post("/v1/embeddings", json={"input": "a"}), 503, code="draining")
        _assert_error(httpx.get(f"{live.url}/health"), 503, code="draining")
        assert httpx.get(f"{live.url}/metrics").status_code == 200
    finally:
        ctx.draining = False
    _assert_healthy(live)


def test_failed_forward_fails_only_its_requests(
    live: LiveServer, client: httpx.Client, offline: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = live.engine.runner
    original = runner.embed
    poison = 4242

    def flaky(batch: Any) -> Any:
        if poison in batch.token_ids:
            raise RuntimeError("injected forward failure")
        return original(batch)

    monkeypatch.setattr(runner, "embed", flaky)
    before = _metric(live, "slipstream_request_failures_total", reason="forward_failed")
    err = _assert_error(
        client.post("/v1/embeddings", json={"input": [[101, poison, 102]]}),
        500,
        code="forward_failed",
    )
    assert err["type"] == "server_error"
    assert _metric(live, "slipstream_request_failures_total", reason="forward_failed") == before + 1
    r = client.post("/v1/embeddings", json={"input": "still works", "encoding_format": "float"})
    assert r.status_code == 200
    got = np.asarray(r.json()["data"][0]["embedding"], np.float32)
    assert np.abs(got - offline.embed("still works")[0]).max() <= ATOL
    _assert_healthy(live)


def test_disconnected_client_has_its_queued_inputs_dropped(live: LiveServer) -> None:
    ae = live.ctx.async_engine
    dropped = ae.stats.dropped_inputs
    first: list[int] = []

    def running_request() -> None:
        r = httpx.post(
            f"{live.url}/embed", json={"inputs": ["runs first"]}, headers=live.headers, timeout=60
        )
        first.append(r.status_code)

    body = b'{"inputs": ["dropped one", "dropped two", "dropped three"]}'
    raw = (
        f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with model_thread_blocked(live):
        t = threading.Thread(target=running_request)
        t.start()
        _wait_for(lambda: ae.running == 1)  # picked into a forward, waiting for the model
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(raw)
        _wait_for(lambda: ae.queued == 3)
        sock.close()  # the client goes away while its inputs wait in the queue
        _wait_for(lambda: ae.queued == 0)
    t.join(60)
    assert first == [200]
    assert ae.stats.dropped_inputs == dropped + 3
    _wait_for(
        lambda: (
            _metric(live, "slipstream_request_failures_total", reason="client_disconnected") >= 1
        )
    )
    _assert_healthy(live)
