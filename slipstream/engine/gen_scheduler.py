"""Continuous batching for generation: token budget, chunked prefill, preemption.

Each step the scheduler builds one :class:`GenerationBatch`:

1. every running request that is decoding gets its one token (a page is allocated when it
   crosses a page boundary; if the pool is empty the prefix cache is evicted, and then the
   most recently admitted running request is preempted, possibly the one asking);
2. running requests in the middle of a chunked prefill get the next chunk, within the token
   budget and the pages available (evicting cached prefixes, never preempting);
3. waiting requests are admitted in arrival order (preempted ones first) while budget, pages
   and ``max_running_requests`` allow, after matching their prefix in the radix cache.

A preempted request frees its pages (full ones go to the prefix cache, where they may be found
again) and is recomputed later from its prompt plus the tokens it already generated: nothing
is lost, and a seeded request samples the same tokens (see ``slipstream.sampling``). If a step
could schedule nothing while requests hold pages, the newest running request is preempted; the
oldest one always fits alone (checked when it is added), so the engine always makes progress.
"""

from __future__ import annotations

import logging
from collections import deque

from slipstream.engine.batch import Phase
from slipstream.engine.gen_batch import GenerationBatch
from slipstream.engine.gen_config import GenerationConfig
from slipstream.engine.gen_request import Request, RequestStatus
from slipstream.kv.allocator import PageAllocator
from slipstream.kv.radix import RadixCache

logger = logging.getLogger("slipstream")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GenerationScheduler:
    def __init__(
        self,
        config: GenerationConfig,
        allocator: PageAllocator,
        radix: RadixCache | None,
        page_size: int,
        debug_checks: bool = False,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.radix = radix
        self.page_size = page_size
        self.debug_checks = debug_checks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = {
            "prefill_tokens_computed": 0,
            "decode_tokens_computed": 0,
            "prefix_cache_hit_tokens": 0,
            "num_preemptions": 0,
            "num_prefill_steps": 0,
            "num_decode_steps": 0,
        }

    # ------------------------------------------------------------------ queues
    def add(self, req: Request) -> None:
        assert req.status is RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ pages
    def _free_and_evictable(self) -> int:
        return self.allocator.num_free + (self.radix.evictable_pages if self.radix else 0)

    def _take_pages(self, n: int) -> list[int] | None:
        """n pages from the free list, evicting cached prefixes if needed; None if impossible."""
        short = n - self.allocator.num_free
        if short > 0 and self.radix is not None:
            self.radix.evict(short)
        if n > self.allocator.num_free:
            return None
        return self.allocator.alloc(n)

    def _pages_needed(self, req: Request, n_tokens: int) -> int:
        return max(0, _cdiv(req.cached_len + n_tokens, self.page_size) - len(req.page_table))

    def _fit_tokens(self, req: Request, n_tokens: int, reserve_pages: int) -> int:
        """Allocate pages for up to ``n_tokens`` new tokens of ``req`` (never preempting).

        Returns how many tokens fit (0 when not even one does)."""
        ps = self.page_size
        room = len(req.page_table) * ps - req.cached_len  # free slots in pages already held
        avail = self._free_and_evictable() - reserve_pages
        if n_tokens > room:
            extra = min(_cdiv(n_tokens - room, ps), max(avail, 0))
            n_tokens = min(n_tokens, room + extra * ps)
        if n_tokens <= 0:
            return 0
        need = self._pages_needed(req, n_tokens)
        pages = self._take_pages(need)
        assert pages is not None, "free + evictable pages were counted but not obtained"
        req.page_table.extend(pages)
        return n_tokens

    def _ensure_decode_page(self, req: Request) -> bool:
        """A page for req's next token, preempting newer requests if needed.

        Returns False when ``req`` itself had to be preempted."""
        need = self._pages_needed(req, 1)
        if need == 0:
            return True
        while True:
            pages = self._take_pages(need)
            if pages is not None:
                req.page_table.extend(pages)
                return True
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False

    # ------------------------------------------------------------------ radix cache
    def _lock_prefix(self, req: Request) -> None:
        """Reuse the longest cached prefix; at least one token is always recomputed so the
        last position's logits exist."""
        if self.radix is None:
            return
        pages, node = self.radix.match_prefix(req.token_ids, max_tokens=req.total_len - 1)
        if not pages:
            return
        self.radix.lock(node)
        req.prefix_node = node
        req.page_table = list(pages)
        req.num_tree_pages = len(pages)
        req.cached_len = len(pages) * self.page_size

    def _unlock_prefix(self, req: Request) -> None:
        if self.radix is not None and req.prefix_node is not None:
            self.radix.unlock(req.prefix_node)
        req.prefix_node = None
        req.num_tree_pages = 0

    def cache_progress(self, req: Request) -> None:
        """Publish req's computed full pages to the prefix cache (after a prefill chunk), so
        later requests sharing the prefix can reuse them while req is still running."""
        if self.radix is None:
            return
        n_full = req.cached_len // self.page_size
        if n_full <= req.num_tree_pages:
            return
        tree_pages, node = self.radix.insert(
            req.token_ids[: n_full * self.page_size], req.page_table[:n_full]
        )
        dups = []
        for i in range(req.num_tree_pages, n_full):
            if req.page_table[i] != tree_pages[i]:
                # Another request inserted the same prefix first: use its page, drop ours.
                dups.append(req.page_table[i])
                req.page_table[i] = tree_pages[i]
        self.radix.lock(node)
        if req.prefix_node is not None:
            self.radix.unlock(req.prefix_node)
        req.prefix_node = node
        req.num_tree_pages = n_full
        if dups:
            self.allocator.free(dups)

    def _release(self, req: Request) -> None:
        """Give back every page of req (full computed pages to the prefix cache)."""
        if self.radix is not None:
            n_full = min(req.cached_len // self.page_size, len(req.page_table))
            own_from = req.num_tree_pages
            if n_full > req.num_tree_pages:
                tree_pages, _ = self.radix.insert(
                    req.token_ids[: n_full * self.page_size], req.page_table[:n_full]
                )
                dups = [
                    mine
                    for mine, tree in zip(
                        req.page_table[own_from:n_full], tree_pages[own_from:], strict=True
                    )
                    if mine != tree
                ]
                if dups:
                    self.allocator.free(dups)
                own_from = n_full
            self._unlock_prefix(req)
            self.allocator.free(req.page_table[own_from:])
        else:
            self.allocator.free(req.page_table)
        req.page_table = []
        req.cached_len = 0
        req.extend_len = 0
        req.num_tree_pages = 0
        req.prefix_node = None

    def preempt(self, req: Request) -> None:
        assert req.status is RequestStatus.RUNNING
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.stats["num_preemptions"] += 1
        self.waiting.appendleft(req)
        logger.debug(
            "preempted request %s (%d tokens) to free KV pages", req.request_id, req.total_len
        )

    def finish(self, req: Request) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> tuple[GenerationBatch, list[Request]] | None:
        while self.has_work():
            planned = self._plan()
            if planned:
                return self._build(planned)
            if not self.running:
                # Nothing holds pages and still nothing fits: add_request's capacity check makes
                # this unreachable; fail loudly rather than spin.
                req = self.waiting[0]
                raise RuntimeError(
                    f"request {req.request_id} ({req.total_len} tokens) cannot be scheduled: "
                    f"{self.allocator.num_free} free KV pages of {self.page_size} tokens"
                )
            self.preempt(self.running[-1])
        return None

    def _plan(self) -> list[Request]:
        planned: list[Request] = []
        budget = self.config.chunked_prefill_tokens
        # 1) decodes: one token each, outside the prefill budget's say (they are cheap and
        #    bounded by max_running_requests); they do consume it.
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or req.remaining_len != 1:
                continue
            if self._ensure_decode_page(req):
                req.extend_len = 1
                planned.append(req)
        budget -= len(planned)
        # 2) chunked prefills already admitted
        for req in self.running:
            if budget <= 0:
                break
            if req.remaining_len <= 1:
                continue
            n = self._fit_tokens(req, min(req.remaining_len, budget), reserve_pages=0)
            if n:
                req.extend_len = n
                planned.append(req)
                budget -= n
        # 3) admissions. While others run, a request is admitted only if its whole chunk fits
        #    with one page per running request left in reserve (so admitting does not force a
        #    preemption at the next decode step); alone, it takes whatever fits.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            self._lock_prefix(req)
            want = min(req.remaining_len, budget)
            reserve = len(self.running)
            if (
                self.running
                and self._pages_needed(req, want) > self._free_and_evictable() - reserve
            ):
                n = 0
            else:
                n = self._fit_tokens(req, want, reserve_pages=0)
            if n == 0:
                self._unlock_prefix(req)  # roll back the match; no page was allocated
                req.page_table = []
                req.cached_len = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if not req.admitted_once:
                req.num_cached_tokens = req.cached_len
                req.admitted_once = True
            self.stats["prefix_cache_hit_tokens"] += req.cached_len
            self.running.append(req)
            req.extend_len = n
            planned.append(req)
            budget -= n
        return planned

    def _build(self, planned: list[Request]) -> tuple[GenerationBatch, list[Request]]:
        ps = self.page_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        sample_rows: list[int] = []
        decode = True
        for row, req in enumerate(planned):
            if self.debug_checks:
                req.check(ps)
            start, n = req.cached_len, req.extend_len
            token_ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            pt = req.page_table
            slots.extend(pt[i // ps] * ps + i % ps for i in range(start, start + n))
            cu.append(cu[-1] + n)
            if start + n == req.total_len:
                sample_rows.append(row)
            is_decode_tok = n == 1 and req.output_len > 0 and start == req.total_len - 1
            decode = decode and n == 1
            key = "decode_tokens_computed" if is_decode_tok else "prefill_tokens_computed"
            self.stats[key] += n
        phase = Phase.DECODE if decode else Phase.PREFILL
        self.stats["num_decode_steps" if decode else "num_prefill_steps"] += 1
        batch = GenerationBatch(
            phase=phase,
            request_ids=tuple(r.request_id for r in planned),
            token_ids=token_ids,
            positions=positions,
            cu_seqlens=cu,
            extend_lens=tuple(r.extend_len for r in planned),
            prefix_lens=tuple(r.cached_len for r in planned),
            page_tables=tuple(list(r.page_table) for r in planned),
            slot_mapping=slots,
            sample_rows=tuple(sample_rows),
            page_size=ps,
        )
        return batch, planned

    def commit(self, planned: list[Request]) -> None:
        """After the forward: the scheduled tokens are now in the cache."""
        for req in planned:
            was_prefill_chunk = req.extend_len > 1
            req.cached_len += req.extend_len
            req.extend_len = 0
            if was_prefill_chunk:
                self.cache_progress(req)
