"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis).

For every operation, schema-conforming (positive) and schema-violating (negative) requests,
a bounded number of each: the server never answers 5xx, every error has the standard body,
and it is healthy afterwards.
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


@pytest.fixture(scope="module")
def live(tiny_qwen3: Path) -> Iterator[LiveServer]:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", max_input_tokens=256)
    settings = ServerSettings(
        served_model_name=NAME, api_key="fuzz-key", max_client_batch_size=128, payload_limit=200_000
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
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    } <= labels
    seen: Counter[tuple[str, str, int]] = Counter()

    def fuzz(op: Any, mode: Any) -> None:
        positive = mode is GenerationMode.POSITIVE

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            if positive and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = NAME  # else nearly every case is a 404
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
    r = httpx.get(f"{live.url}/health", timeout=10)
    assert r.status_code == 200
