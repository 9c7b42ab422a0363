"""CUDA graphs for decode: the whole model forward plus the logits GEMM, per padded batch size.

Static device buffers hold the inputs (token ids, positions, slot mapping, page table, KV
lengths) and the output logits. A replay copies the real batch into the first ``B`` rows,
fills the padding rows of the bucket with a dummy sequence that lives entirely in the reserved
scratch page 0 (slot 0, one key), and returns ``logits[:B]``. Padded rows therefore never read
or write a real sequence's cache, and ``q.shape[0] == cu_seqlens[-1]`` holds in every layer.

Only used on CUDA with a backend whose decode path reads device tensors only (``flash``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slipstream.attention.paged import (
    PagedAttentionMetadata,
    choose_num_kv_splits,
    page_table_tensor,
)
from slipstream.config import ModelConfig
from slipstream.engine.gen_batch import GenerationBatch
from slipstream.engine.gen_runner import lm_head_weight
from slipstream.kv.pool import KVPool

logger = logging.getLogger("slipstream")

# Padded batch sizes captured (cut at the configured maximum, which is always included).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
           320, 384, 448, 512)  # fmt: skip

# Backends whose decode path is capture-safe (reads device tensors only, no host sync).
GRAPH_SAFE_BACKENDS = frozenset({"flash"})


@contextlib.contextmanager
def static_rotary(model: nn.Module, max_positions: int, device: torch.device) -> Iterator[None]:
    """Pin the rotary lookup to tables built before capture.

    ``RotaryEmbedding.cos_sin`` already gathers from a table built once per device (no host
    sync); here the gathered ``cos``/``sin`` for every position the model allows are built
    before capture and kept on ``model``, so the captured graphs' pointers stay valid after this
    context exits and nothing is allocated for the table inside a capture.
    """
    rotary: Any = model.rotary
    cos, sin = rotary.cos_sin(torch.arange(max_positions, device=device))
    model._slipstream_graph_rotary = (cos, sin)  # type: ignore[assignment]

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[positions], sin[positions]

    rotary.cos_sin = cos_sin
    try:
        yield
    finally:
        del rotary.cos_sin  # back to the class method for eager forwards


class DecodeCudaGraphs:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        pool: KVPool,
        device: torch.device,
        max_batch_size: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.pool = pool
        self.device = device
        self.max_bs = max_batch_size
        self.max_model_len = max_model_len
        self.buckets = sorted({b for b in BUCKETS if b < max_batch_size} | {max_batch_size})
        ps = pool.page_size
        self.max_pages = -(-max_model_len // ps)
        self.weight = lm_head_weight(model)
        with torch.inference_mode():
            i64, i32 = torch.int64, torch.int32
            self.ids = torch.zeros(self.max_bs, dtype=i64, device=device)
            self.pos = torch.zeros(self.max_bs, dtype=i64, device=device)
            self.slots = torch.zeros(self.max_bs, dtype=i64, device=device)
            self.kv_lens = torch.ones(self.max_bs, dtype=i32, device=device)
            self.prefix_lens = torch.zeros(self.max_bs, dtype=i32, device=device)
            self.page_table = torch.zeros(self.max_bs, self.max_pages, dtype=i32, device=device)
            self.cu = torch.arange(self.max_bs + 1, dtype=i32, device=device)
            self.logits = torch.empty(
                self.max_bs, self.weight.shape[0], dtype=self.weight.dtype, device=device
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.metas: dict[int, PagedAttentionMetadata] = {}
        self.mempool: Any = None

    # ---------------------------------------------------------------- capture
    def _meta(self, bs: int) -> PagedAttentionMetadata:
        splits = choose_num_kv_splits(
            bs, self.model_config.num_kv_heads, self.max_model_len, self.device
        )
        return PagedAttentionMetadata(
            cu_seqlens_q=self.cu[: bs + 1],
            cu_seqlens_k=self.cu[: bs + 1],  # not read by the decode paths
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
            # Host tuples describe capture time only; decode paths read kv_lens / page_table.
            seq_lens_q=(1,) * bs,
            seq_lens_k=(1,) * bs,
            causal=True,
            k_caches=self.pool.k_caches,
            v_caches=self.pool.v_caches,
            slot_mapping=self.slots[:bs],
            page_table=self.page_table[:bs],
            kv_lens=self.kv_lens[:bs],
            prefix_lens_t=self.prefix_lens[:bs],
            prefix_lens=(0,) * bs,
            page_size=self.pool.page_size,
            is_decode=True,
            num_kv_splits=splits,
        )

    def _forward(self, bs: int, meta: PagedAttentionMetadata) -> None:
        hidden = self.model(self.ids[:bs], self.pos[:bs], meta)  # [bs, hidden]
        # Straight into the static logits rows: a contiguous row slice, so no copy.
        torch.mm(hidden, self.weight.t(), out=self.logits[:bs])

    def _reset_padding(self, start: int, end: int) -> None:
        """Rows [start, end) become dummy sequences in the scratch page 0."""
        if end <= start:
            return
        self.ids[start:end].zero_()
        self.pos[start:end].zero_()
        self.slots[start:end].zero_()
        self.kv_lens[start:end].fill_(1)
        self.page_table[start:end, 0].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        self._reset_padding(0, self.max_bs)
        self.page_table.zero_()
        stream = torch.cuda.Stream(device=self.device)
        self.mempool = torch.cuda.graph_pool_handle()
        with static_rotary(self.model, self.max_model_len, self.device):
            for bs in reversed(self.buckets):  # largest first: later ones reuse its memory
                meta = self._meta(bs)
                # Warm up outside capture: Triton compiles (per specialisation) here, not
                # during capture.
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._forward(bs, meta)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=self.mempool, stream=stream, capture_error_mode="thread_local"
                ):
                    self._forward(bs, meta)
                self.graphs[bs] = graph
                self.metas[bs] = meta
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.buckets,
            time.perf_counter() - t0,
        )

    # ---------------------------------------------------------------- replay
    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest captured graph ({self.max_bs})")

    def can_run(self, batch: GenerationBatch) -> bool:
        return (
            batch.num_seqs <= self.max_bs
            and bool(self.graphs)
            and max(len(p) for p in batch.page_tables) <= self.max_pages
        )

    def replay(self, batch: GenerationBatch) -> torch.Tensor:
        """Logits [B, vocab] of the real rows: a view of the static buffer, valid until the
        next replay (sample from it first)."""
        b = batch.num_seqs
        bs = self.bucket(b)
        pad = bs - b
        width = max(len(p) for p in batch.page_tables)
        ints = torch.tensor(
            [
                batch.token_ids + [0] * pad,
                batch.positions + [0] * pad,
                batch.slot_mapping + [0] * pad,
            ],
            dtype=torch.int64,
        )
        lens = torch.tensor(list(batch.kv_lens) + [1] * pad, dtype=torch.int32)
        pt = page_table_tensor(batch.page_tables, bs)  # padded rows: page 0 only
        if self.device.type == "cuda":
            ints, lens, pt = ints.pin_memory(), lens.pin_memory(), pt.pin_memory()
        self.ids[:bs].copy_(ints[0], non_blocking=True)
        self.pos[:bs].copy_(ints[1], non_blocking=True)
        self.slots[:bs].copy_(ints[2], non_blocking=True)
        self.kv_lens[:bs].copy_(lens, non_blocking=True)
        # Columns past `width` keep stale ids: never read (kv_lens bounds every row).
        self.page_table[:bs, :width].copy_(pt, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[:b]
