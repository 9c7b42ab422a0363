"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis).

For every operation, schema-conforming (positive) and schema-violating (negative) requests,
a bounded number of each: the server never answers 5xx, every error has the standard body,
and it is healthy afterwards. The generation routes get fewer examples, and the server caps
max_tokens (``max_completion_tokens``) so that each generation stays a few steps long.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from slipstream import Engine  # noqa: E402
from slipstream.server.settings import ServerSettings  # noqa: E402
from slipstream.server.testing import LiveServer  # noqa: E402

NAME = "qwen3-tiny"
MAX_EXAMPLES = 100  # per operation and generation mode
GEN_MAX_EXAMPLES = 60  # for the generation routes (each positive case may generate)
GEN_ROUTES = {"/v1/completions", "/v1/chat/completions"}
# Fields the generation routes reject unless left at their defaults (test_server_generate.py
# covers that): every other positive case drops them, so that more cases reach the model.
UNSUPPORTED = (
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tools",
)
MAX_COMPLETION_TOKENS = 4


@pytest.fixture(scope="module")
def live(tiny_qwen3: Path) -> Iterator[LiveServer]:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", max_input_tokens=256)
    settings = ServerSettings(
        served_model_name=NAME,
        api_key="fuzz-key",
        max_client_batch_size=128,
        payload_limit=200_000,
        max_completion_tokens=MAX_COMPLETION_TOKENS,
    )
    with LiveServer(engine, settings) as server:
        yield server


def test_schemathesis_no_server_errors(live: LiveServer) -> None:
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=live.headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {
        "POST /v1/embeddings",
        "POST /embed",
        "POST /tokenize",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    } <= labels
    seen: Counter[tuple[str, str, int]] = Counter()
    calls: Counter[str] = Counter()

    def fuzz(op: Any, mode: Any) -> None:
        positive = mode is GenerationMode.POSITIVE

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=GEN_MAX_EXAMPLES if op.path in GEN_ROUTES else MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            if positive and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = NAME  # else nearly every case is a 404
            calls[op.path] += 1
            if positive and op.path in GEN_ROUTES and isinstance(case.body, dict):
                if calls[op.path] % 2:
                    for name in UNSUPPORTED:
                        case.body.pop(name, None)
            response = case.call(base_url=live.url, headers=live.headers, timeout=60)
            seen[(op.path, mode.value, response.status_code)] += 1
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}

        check()

    for op in operations:
        fuzz(op, GenerationMode.POSITIVE)
        if op.method.lower() == "post":  # a GET without parameters has no negative cases
            fuzz(op, GenerationMode.NEGATIVE)

    # the positive cases reached the model, not only the validation
    assert seen[("/v1/embeddings", "positive", 200)] > 0
    assert seen[("/embed", "positive", 200)] > 0
    assert seen[("/v1/completions", "positive", 200)] > 0
    assert seen[("/v1/chat/completions", "positive", 200)] > 0
    # nothing is left generating, and the KV pool is whole again
    ae = live.ctx.async_engine
    assert ae.generations == 0 and ae.in_flight == 0
    stats = live.call(lambda: ae.run_on_model_thread(ae.generation_stats))
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["free_kv_pages"] + stats["prefix_cache_pages"] == stats["num_kv_pages"] - 1
    r = httpx.get(f"{live.url}/health", timeout=10)
    assert r.status_code == 200
