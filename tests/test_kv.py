"""Paged KV pool, page allocator and radix prefix cache (pure bookkeeping, no model)."""

from __future__ import annotations

import pytest
import torch

from slipstream.config import ModelConfig
from slipstream.errors import ConfigError
from slipstream.kv import KVPool, OutOfPagesError, PageAllocator, RadixCache, kv_bytes_per_token

PS = 4


def _toks(*runs: tuple[int, int]) -> list[int]:
    """Concatenated ranges: _toks((0, 8), (100, 104)) -> [0..7, 100..103]."""
    out: list[int] = []
    for a, b in runs:
        out.extend(range(a, b))
    return out


def test_allocator_reserves_page_zero_and_catches_double_free() -> None:
    a = PageAllocator(5)
    assert a.num_free == a.num_usable == 4
    pages = a.alloc(4)
    assert sorted(pages) == [1, 2, 3, 4] and 0 not in pages
    with pytest.raises(OutOfPagesError):
        a.alloc(1)
    a.free(pages[:2])
    assert a.num_free == 2 and a.num_used == 2
    with pytest.raises(AssertionError, match="double free"):
        a.free(pages[:1])
    with pytest.raises(AssertionError):
        a.free([0])  # the scratch page is never allocated, so never freed


def test_pool_shapes_views_and_sizing(tiny_qwen3) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig.from_hf(tiny_qwen3)
    pool = KVPool(cfg.num_layers, 6, PS, cfg.num_kv_heads, cfg.head_dim, torch.float32,
                  torch.device("cpu"))  # fmt: skip
    assert len(pool.k_caches) == cfg.num_layers
    assert pool.k_caches[1].shape == (6, PS, cfg.num_kv_heads, cfg.head_dim)
    assert pool.k_caches[0].is_contiguous()
    pool.k_caches[1][2, 3].fill_(1.0)  # views share the one buffer
    assert pool.buffer[0, 1, 2, 3].eq(1.0).all() and pool.buffer[1].eq(0).all()
    assert pool.capacity_tokens == 5 * PS
    per_tok = kv_bytes_per_token(cfg, torch.float32)
    assert per_tok == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert pool.nbytes == 6 * PS * per_tok
    assert KVPool.pages_for_bytes(10 * PS * per_tok + 1, cfg, torch.float32, PS) == 10
    assert "GiB" in pool.describe()
    with pytest.raises(ConfigError, match="at least 2 pages"):
        KVPool(1, 1, PS, 1, 16, torch.float32, torch.device("cpu"))


def test_radix_match_insert_split_and_duplicates() -> None:
    a = PageAllocator(32)
    rc = RadixCache(PS, a)
    seq1 = _toks((0, 12))  # 3 pages
    p1 = a.alloc(3)
    tree, node = rc.insert(seq1, p1)
    assert tree == p1 and rc.evictable_pages == 3

    # A longer sequence sharing 2 pages, then diverging: the node is split after 2 pages.
    seq2 = _toks((0, 8), (50, 58))
    pages, node2 = rc.match_prefix(seq2)
    assert pages == p1[:2]
    own = a.alloc(2)
    tree2, _ = rc.insert(seq2, pages + own)
    assert tree2 == p1[:2] + own
    rc.check_invariants()
    assert rc.cached_pages == 5

    # Partial last page is never matched; max_tokens caps the match (whole pages only).
    assert rc.match_prefix(seq1 + [99])[0] == p1
    assert rc.match_prefix(seq1, max_tokens=11)[0] == p1[:2]
    assert rc.match_prefix(seq1, max_tokens=3)[0] == []
    assert rc.match_prefix([1, 2, 3, 4])[0] == []  # first page differs

    # Inserting a prefix computed twice returns the tree's pages: the caller frees its copies.
    dup = a.alloc(3)
    tree3, _ = rc.insert(seq1, dup)
    assert tree3 == p1
    a.free(dup)
    rc.check_invariants()


def test_radix_locking_protects_and_lru_eviction_frees_leaves_first() -> None:
    a = PageAllocator(16)
    rc = RadixCache(PS, a)
    old = _toks((0, 8))
    new = _toks((100, 108))
    shared = _toks((0, 4), (200, 204))  # shares old's first page
    rc.insert(old, a.alloc(2))
    rc.insert(new, a.alloc(2))
    pages, node = rc.match_prefix(shared)  # touches old's first page (splits old)
    rc.insert(shared, pages + a.alloc(1))
    rc.check_invariants()
    free_before = a.num_free

    _, locked = rc.match_prefix(new)
    rc.lock(locked)
    assert rc.protected_pages == 2
    rc.check_invariants()
    # Evict 1 page: the least recently used unlocked leaf goes first (old's tail page).
    assert rc.evict(1) == 1
    assert rc.match_prefix(old)[0] == rc.match_prefix(shared)[0][:1]
    assert a.num_free == free_before + 1
    # Everything unlocked can go; the locked path stays.
    rc.evict(100)
    assert rc.match_prefix(new)[0] != [] and rc.cached_pages == 2
    rc.unlock(locked)
    assert rc.evictable_pages == 2
    assert rc.evict(100) == 2
    assert rc.cached_pages == 0 and a.num_free == a.num_usable
    rc.check_invariants()


def test_radix_lock_survives_split() -> None:
    a = PageAllocator(16)
    rc = RadixCache(PS, a)
    seq = _toks((0, 12))
    _, node = rc.insert(seq, a.alloc(3))
    rc.lock(node)
    # A match that stops inside the locked node splits it; both halves stay locked.
    pages, upper = rc.match_prefix(_toks((0, 4), (500, 504)))
    assert len(pages) == 1 and upper.lock_ref == 1
    rc.check_invariants()
    assert rc.evict(10) == 0
    rc.unlock(node)
    rc.check_invariants()
    assert rc.evict(10) == 3
