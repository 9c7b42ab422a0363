"""Settings of the generation machinery (paged KV pool, scheduler, CUDA graphs)."""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.errors import ConfigError

DEFAULT_PAGE_SIZE = 16
DEFAULT_CHUNKED_PREFILL_TOKENS = 8192
DEFAULT_MAX_RUNNING_REQUESTS = 256


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """Validated once in ``Engine.__init__`` (cheap: nothing is allocated until ``generate``)."""

    page_size: int = DEFAULT_PAGE_SIZE
    # KV pool size: ``num_kv_pages`` (tests) wins over ``kv_cache_gb``; with neither, the pool
    # takes what is free on the GPU after a warm-up forward (a fixed default on CPU).
    kv_cache_gb: float | None = None
    num_kv_pages: int | None = None
    # Token budget of one forward (prefill chunks + one token per decoding request): long
    # prompts are split into chunks of at most this many tokens.
    chunked_prefill_tokens: int = DEFAULT_CHUNKED_PREFILL_TOKENS
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    disable_prefix_cache: bool = False
    disable_cuda_graph: bool = False
    # Largest decode batch captured in a CUDA graph (bigger batches run eagerly).
    cuda_graph_max_batch_size: int = DEFAULT_MAX_RUNNING_REQUESTS
    # Share of total GPU memory the process may use once the pool is allocated.
    gpu_memory_fraction: float = 0.90

    def __post_init__(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int):
            raise ConfigError(f"page_size must be an integer, got {self.page_size!r}")
        if not 1 <= self.page_size <= 1024:
            raise ConfigError(f"page_size must be in [1, 1024], got {self.page_size}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ConfigError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ConfigError(
                f"num_kv_pages must be >= 2 (page 0 is reserved scratch), got {self.num_kv_pages}"
            )
        if self.chunked_prefill_tokens < 1:
            raise ConfigError(
                f"chunked_prefill_tokens must be >= 1, got {self.chunked_prefill_tokens}"
            )
        if self.max_running_requests < 1:
            raise ConfigError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.cuda_graph_max_batch_size < 1:
            raise ConfigError(
                f"cuda_graph_max_batch_size must be >= 1, got {self.cuda_graph_max_batch_size}"
            )
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError(
                f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}"
            )
