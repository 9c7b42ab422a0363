"""Radix prefix cache over KV pages.

A radix tree whose edges are runs of *full* pages: a node holds ``key`` (its tokens, a multiple
of ``page_size`` long) and ``pages`` (one page id per ``page_size`` tokens). Children are indexed
by their first page's tokens, so two children never share a first page. Only full pages are
cached, which keeps sharing simple: a shared page is never written again (a sequence only
writes at positions past its cached prefix, and the partial page it is filling is its own).

Ownership: a page is owned either by the tree (once inserted) or by exactly one request (its
tail beyond the prefix it shares). Requests *lock* the path from their deepest matched node to
the root (``lock_ref`` per node): locked nodes are never evicted. Unlocked leaves are evicted in
least-recently-used order when the pool runs short.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from slipstream.kv.allocator import PageAllocator


class RadixNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access", "uid")

    _ids = itertools.count()

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.uid = next(RadixNode._ids)  # heap tie-breaker

    def __repr__(self) -> str:
        return f"RadixNode(pages={self.pages}, lock_ref={self.lock_ref}, children={len(self.children)})"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self.root = RadixNode((), [], None)
        self.root.lock_ref = 1  # never evicted, never counted
        self._clock = 0
        self.evictable_pages = 0  # pages in unlocked nodes
        self.protected_pages = 0  # pages in locked nodes

    # ------------------------------------------------------------------------ helpers
    @property
    def cached_pages(self) -> int:
        return self.evictable_pages + self.protected_pages

    def _touch(self, node: RadixNode) -> None:
        self._clock += 1
        node.last_access = self._clock

    def _child_key(self, tokens: Sequence[int], pos: int) -> tuple[int, ...]:
        return tuple(tokens[pos : pos + self.page_size])

    def _split(self, child: RadixNode, n_pages: int) -> RadixNode:
        """Cut ``child`` after its first ``n_pages`` pages; returns the new upper node."""
        assert 0 < n_pages < len(child.pages)
        ps = self.page_size
        parent = child.parent
        assert parent is not None
        upper = RadixNode(child.key[: n_pages * ps], child.pages[:n_pages], parent)
        upper.lock_ref = child.lock_ref  # every lock through child also passes through upper
        upper.last_access = child.last_access
        child.key = child.key[n_pages * ps :]
        child.pages = child.pages[n_pages:]
        child.parent = upper
        upper.children[child.key[:ps]] = child
        parent.children[upper.key[:ps]] = upper
        return upper

    # ------------------------------------------------------------------------ API
    def match_prefix(
        self, tokens: Sequence[int], max_tokens: int | None = None
    ) -> tuple[list[int], RadixNode]:
        """Longest cached prefix of ``tokens`` in whole pages, at most ``max_tokens`` tokens.

        Returns its pages and the deepest node reached (lock it to keep the pages alive).
        """
        ps = self.page_size
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        max_pages = limit // ps
        node = self.root
        pages: list[int] = []
        pos = 0
        while len(pages) < max_pages:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            common = _common_prefix(child.key, tokens[pos : pos + len(child.key)])
            n = min(common // ps, max_pages - len(pages))
            assert n >= 1  # the first page matched through the children index
            if n < len(child.pages):
                child = self._split(child, n)
            pages.extend(child.pages)
            pos += n * ps
            node = child
            self._touch(node)
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Insert ``tokens`` (``len(pages) * page_size`` of them) backed by ``pages``.

        Returns the tree's pages for that prefix and the deepest node. Where the tree already
        held a page for a position, its page is returned instead of the caller's: the caller
        owns the difference (a duplicate it computed concurrently) and must free it. Every other
        page of ``pages`` now belongs to the tree.
        """
        ps = self.page_size
        assert len(tokens) == len(pages) * ps, "insert whole pages only"
        node = self.root
        out: list[int] = []
        pos = 0
        while pos < len(tokens):
            key = self._child_key(tokens, pos)
            child = node.children.get(key)
            if child is None:
                new = RadixNode(tuple(tokens[pos:]), list(pages[pos // ps :]), node)
                node.children[key] = new
                self.evictable_pages += len(new.pages)
                out.extend(new.pages)
                self._touch(new)
                return out, new
            common = _common_prefix(child.key, tokens[pos : pos + len(child.key)])
            n = common // ps
            assert n >= 1
            if n < len(child.pages):
                child = self._split(child, n)
            out.extend(child.pages)
            pos += n * ps
            node = child
            self._touch(node)
        return out, node

    def lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
                self.protected_pages += len(node.pages)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
                self.protected_pages -= len(node.pages)
            assert node.parent is not None
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages if possible, least recently used leaves first.

        Returns the number of pages freed (whole nodes are evicted, so possibly more).
        """
        if num_pages <= 0 or self.evictable_pages == 0:
            return 0
        heap: list[tuple[int, int, RadixNode]] = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root and not n.children and n.lock_ref == 0:
                heap.append((n.last_access, n.uid, n))
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[: self.page_size]]
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self.evictable_pages -= len(node.pages)
            node.parent = None
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return freed

    def check_invariants(self) -> None:
        """Debug/test helper: page accounting and tree shape are consistent."""
        evictable = protected = 0
        seen: set[int] = set()
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            assert n.parent is not None and n.parent.children[n.key[: self.page_size]] is n
            assert len(n.key) == len(n.pages) * self.page_size and n.pages
            if n.parent is not self.root:
                assert n.lock_ref <= n.parent.lock_ref, "a locked node has an unlocked parent"
            for p in n.pages:
                assert p not in seen, f"page {p} twice in the tree"
                seen.add(p)
            if n.lock_ref:
                protected += len(n.pages)
            else:
                evictable += len(n.pages)
            stack.extend(n.children.values())
        assert (evictable, protected) == (self.evictable_pages, self.protected_pages)
