"""Paged KV cache for generation: the page pool, its allocator, and the radix prefix cache.

Nothing here is created by the embedding path (``Phase.EMBED`` never touches a KV cache).
"""

from __future__ import annotations

from slipstream.kv.allocator import OutOfPagesError, PageAllocator
from slipstream.kv.pool import KVPool, kv_bytes_per_token
from slipstream.kv.radix import RadixCache, RadixNode

__all__ = [
    "KVPool",
    "OutOfPagesError",
    "PageAllocator",
    "RadixCache",
    "RadixNode",
    "kv_bytes_per_token",
]
