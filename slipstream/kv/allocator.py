"""Page allocator: a free list over the pool's page ids (page 0 is never handed out)."""

from __future__ import annotations

from collections.abc import Iterable

from slipstream.errors import SlipstreamError


class OutOfPagesError(SlipstreamError):
    """The pool has fewer free pages than asked for (the scheduler evicts or preempts first)."""


class PageAllocator:
    """LIFO free list of page ids in ``[reserved, num_pages)``.

    Ids below ``reserved`` are never allocated: page 0 is the scratch page that padded CUDA-graph
    rows read and write, so a real sequence's cache is never touched by them. A bitmap catches
    double frees and frees of pages that were never allocated (cheap, always on: such a bug would
    silently corrupt another sequence's cache).
    """

    def __init__(self, num_pages: int, reserved: int = 1) -> None:
        if num_pages <= reserved:
            raise ValueError(f"num_pages ({num_pages}) must exceed the reserved pages ({reserved})")
        self.num_pages = num_pages
        self.reserved = reserved
        # Popped from the end: low ids first (deterministic, and tests read better).
        self._free: list[int] = list(range(num_pages - 1, reserved - 1, -1))
        self._used = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.reserved

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            if not self.reserved <= p < self.num_pages or not self._used[p]:
                raise AssertionError(f"page {p} freed but not allocated (double free?)")
            self._used[p] = 0
            self._free.append(p)
