"""The paged KV pool: K and V pages for every layer in one allocation."""

from __future__ import annotations

import logging

import torch

from slipstream.config import ModelConfig
from slipstream.errors import ConfigError

logger = logging.getLogger("slipstream")

GIB = 1024**3


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token across all layers."""
    elsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elsize


class KVPool:
    """``k_caches[layer]`` / ``v_caches[layer]``: ``[num_pages, page_size, Hkv, D]`` views of one
    buffer ``[2, L, num_pages, page_size, Hkv, D]``.

    Page 0 is reserved scratch space (see :class:`slipstream.kv.PageAllocator`). The buffer is
    zero-filled once so that no page ever holds NaN/inf garbage: a masked-out score times a
    garbage value would still be NaN in a plain-torch path.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 2:
            raise ConfigError(
                f"the KV pool needs at least 2 pages (1 scratch + 1 usable), got {num_pages}; "
                "raise kv_cache_gb"
            )
        if page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.buffer = torch.zeros(
            2, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.k_caches: tuple[torch.Tensor, ...] = tuple(
            self.buffer[0, i] for i in range(num_layers)
        )
        self.v_caches: tuple[torch.Tensor, ...] = tuple(
            self.buffer[1, i] for i in range(num_layers)
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def bytes_per_page(self) -> int:
        return self.nbytes // self.num_pages

    @property
    def capacity_tokens(self) -> int:
        """Tokens that real sequences can hold (the scratch page excluded)."""
        return (self.num_pages - 1) * self.page_size

    @staticmethod
    def pages_for_bytes(
        budget_bytes: float, cfg: ModelConfig, dtype: torch.dtype, page_size: int
    ) -> int:
        return int(budget_bytes // (kv_bytes_per_token(cfg, dtype) * page_size))

    def describe(self) -> str:
        return (
            f"KV cache: {self.nbytes / GIB:.3f} GiB, {self.num_pages} pages x {self.page_size} "
            f"tokens ({self.capacity_tokens} tokens usable), {self.num_layers} layers, "
            f"{str(self.dtype).removeprefix('torch.')}"
        )
