"""Server settings: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.errors import ConfigError

DEFAULT_SERVED_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """HTTP-side settings (the engine's own settings live in ``EngineConfig``)."""

    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    host: str = "127.0.0.1"
    port: int = 8000
    # When set, every route but /health and /metrics needs ``Authorization: Bearer <key>``.
    api_key: str | None = None
    # Most inputs in one request (413 above it); OpenAI's own limit is 2048.
    max_client_batch_size: int = 2048
    # Most inputs admitted at once, over all requests (queued, tokenizing or running);
    # a request that would go over it gets 429 at once instead of queueing.
    max_concurrent_requests: int = 8192
    # Largest request body in bytes (413 above it).
    payload_limit: int = 2_000_000
    # Truncate over-long inputs to max_input_tokens instead of answering 400.
    auto_truncate: bool = False
    # Seconds to wait for in-flight requests after SIGTERM / SIGINT.
    shutdown_timeout: float = 30.0
    # Threads that tokenize (each request's inputs are one encode_batch call).
    tokenizer_threads: int = 1
    access_log: bool = False
    # Most tokens one generation request may ask for (``max_tokens`` /
    # ``max_completion_tokens``; 400 above). None: the model's context is the only limit.
    # It also caps the defaults (16 for completions, the rest of the context for chat).
    max_completion_tokens: int | None = None
    # A Jinja chat template (the text) that replaces the model's own, if any.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("served_model_name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (leave it unset to disable auth)")
        for name in (
            "max_client_batch_size",
            "max_concurrent_requests",
            "payload_limit",
            "tokenizer_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent_requests < self.max_client_batch_size:
            raise ConfigError(
                f"max_concurrent_requests ({self.max_concurrent_requests}) must be >= "
                f"max_client_batch_size ({self.max_client_batch_size}), or a full request "
                "could never be admitted"
            )
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise ConfigError(
                f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}"
            )
        if self.chat_template is not None and not self.chat_template.strip():
            raise ConfigError("chat_template must not be empty (leave it unset to use the model's)")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
