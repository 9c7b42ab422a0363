"""Prometheus metrics. Each app gets its own registry, so several servers can live in one
process (tests) without clashing in prometheus-client's global registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_TOKEN_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)
_POW2 = tuple(float(2**i) for i in range(0, 11))  # 1 .. 1024
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(2, 18))  # 4 .. 131072


class ServerMetrics:
    """Everything /metrics exposes. Gauges are read from the async engine at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.registry = r
        self.queue_size = Gauge(
            "slipstream_queue_size", "Inputs queued for a forward pass", registry=r
        )
        self.running_inputs = Gauge(
            "slipstream_running_inputs", "Inputs in the forward pass now running", registry=r
        )
        self.inputs_in_flight = Gauge(
            "slipstream_inputs_in_flight",
            "Admitted inputs not yet answered (tokenizing, queued or running); "
            "--max-concurrent-requests bounds it",
            registry=r,
        )
        self.batch_tokens = Histogram(
            "slipstream_batch_tokens",
            "Tokens per forward pass",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slipstream_batch_size", "Inputs per forward pass", buckets=_POW2, registry=r
        )
        self.batch_requests = Histogram(
            "slipstream_batch_requests",
            "Distinct requests whose inputs share one forward pass",
            buckets=_POW2,
            registry=r,
        )
        self.request_latency = Histogram(
            "slipstream_request_duration_seconds",
            "HTTP request latency, from the first byte in to the response sent",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "slipstream_queue_time_seconds",
            "Per input: time from being queued (after tokenization) to its forward starting",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenization_time = Histogram(
            "slipstream_tokenization_time_seconds",
            "Per request: time to validate and tokenize its inputs",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "slipstream_inference_time_seconds",
            "Per forward pass: model, pooling and post-processing",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "slipstream_prompt_tokens", "Tokens embedded (after truncation)", registry=r
        )
        self.requests = Counter(
            "slipstream_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.failures = Counter(
            "slipstream_request_failures",
            "Requests that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.forward_failures = Counter(
            "slipstream_forward_failures",
            "Forward passes (embedding forwards and generation steps) that raised",
            registry=r,
        )
        # generation
        self.generations_running = Gauge(
            "slipstream_generation_requests_running",
            "Generation requests (one per prompt) submitted and not yet finished",
            registry=r,
        )
        self.gen_finished = Counter(
            "slipstream_generation_requests",
            "Generation requests (one per prompt) that ended, by finish reason "
            "(stop, length, abort: the client left, error)",
            ["finish_reason"],
            registry=r,
        )
        self.gen_prompt_tokens = Counter(
            "slipstream_generation_prompt_tokens",
            "Prompt tokens of generation requests (after the chat template)",
            registry=r,
        )
        self.gen_tokens = Counter(
            "slipstream_generation_tokens",
            "Tokens generated (a terminating EOS token included)",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "slipstream_time_to_first_token_seconds",
            "Per generation request: from submission (after tokenization) to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "slipstream_inter_token_latency_seconds",
            "Per generated token after the first: time since the request's previous token",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.gen_step_time = Histogram(
            "slipstream_generation_step_seconds",
            "Per generation step (one forward over every running request, plus sampling)",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )

    def bind_gauges(
        self,
        queued: Callable[[], float],
        running: Callable[[], float],
        in_flight: Callable[[], float],
    ) -> None:
        self.queue_size.set_function(queued)
        self.running_inputs.set_function(running)
        self.inputs_in_flight.set_function(in_flight)

    def bind_generation_gauge(self, running: Callable[[], float]) -> None:
        self.generations_running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
