"""CUDA graphs for embedding forwards: the whole model and the pooling, replayed per shape bucket.

An embedding forward launches ~10 kernels per layer; on a slow host, enqueueing them takes longer
than the GPU takes to run them (benchmarks/results/embed_timeline_mixed_fp8_h100_slowhost.json:
22 of 25 forwards host-bound). A replay is one launch.

Buckets. A forward of ``T`` tokens in ``B`` sequences runs in the graph of key
``(T_b, B_b, S)``: ``T_b`` is ``T`` rounded up to a multiple of ``TOKEN_STEP``, ``B_b`` the next
power of two above ``B`` (at least ``B + 1``), and ``S`` the attention kernel's power-of-two
bucket of the longest sequence (its autotuned config is baked into the capture). Static buffers
hold the inputs: token ids and positions ``[T_max]``, ``cu_seqlens`` ``[B_max + 1]``. The
``T_b - T`` padding tokens form one dummy sequence of their own after the real ones and the
remaining ``B_b - B - 1`` sequences are empty, so ``q.shape[0] == cu_seqlens[-1]`` holds and a
padding row never meets a real one. The pooled rows of the real sequences come back as a copy
(the static output is overwritten by the next replay).

A key's first forward runs eagerly (Triton compiles and autotunes, the fused ops run their
first-use checks), then the graph is captured; later forwards of that key replay it. All graphs
share one memory pool (they never run concurrently, and each rewrites its intermediates before
reading them); at most ``MAX_GRAPHS`` are kept, least recently used dropped first.

For every model and pooling mode (the pooled forward, `ModelRunner.pooled_forward`, reads
device tensors only: last-token pooling of the decoder models, and CLS / mean pooling through
`layers.pooler.pool`), with a capture-safe attention backend; other settings run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slipstream.attention.base import AttentionMetadata
from slipstream.engine.batch import Batch
from slipstream.kernels.flash_attn import seq_bucket

logger = logging.getLogger("slipstream")

TOKEN_STEP = 256
MAX_GRAPHS = 96


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def graph_key(batch: Batch, max_tokens: int, max_seqs: int) -> tuple[int, int, int] | None:
    """``(T_b, B_b, S)`` for ``batch`` (see the module docstring), or None when it does not fit
    buffers of ``max_tokens`` tokens and ``max_seqs`` sequences."""
    t, b = batch.num_tokens, batch.num_seqs
    t_b = -(-t // TOKEN_STEP) * TOKEN_STEP
    b_b = _pow2_at_least(b + 1)
    if t == 0 or t_b > max_tokens or b_b > max_seqs:
        return None
    return (t_b, b_b, seq_bucket(max(batch.max_seqlen, t_b - t)))


def padded_inputs(
    batch: Batch, t_b: int, b_b: int, max_positions: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays for the static buffers: int64 [2, T_b] (token ids; positions) and int32
    cu_seqlens [B_b + 1]. Padding tokens are id 0 at positions 0.. of one dummy sequence after
    the real ones (modulo ``max_positions``, so a model with a short position table can look
    them up); the sequences after it are empty."""
    t = batch.num_tokens
    both = np.zeros((2, t_b), dtype=np.int64)
    both[0, :t] = batch.token_ids
    both[1, :t] = batch.positions
    pad_pos = np.arange(t_b - t)
    both[1, t:] = pad_pos % max_positions if max_positions else pad_pos
    cu = np.full(b_b + 1, t_b, dtype=np.int32)
    cu[: batch.num_seqs + 1] = batch.cu_seqlens
    return both, cu


class EmbedCudaGraphs:
    def __init__(
        self,
        pooled_forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        device: torch.device,
        max_tokens: int,
        max_seqs: int,
        causal: bool,
        max_graphs: int = MAX_GRAPHS,
        max_positions: int | None = None,
    ) -> None:
        # pooled_forward(ids, positions, meta) -> float32 [B, hidden], from device tensors only
        self.pooled_forward = pooled_forward
        self.max_positions = max_positions
        self.device = device
        self.causal = causal
        self.max_tokens = -(-max_tokens // TOKEN_STEP) * TOKEN_STEP
        self.max_seqs = _pow2_at_least(max_seqs + 1)
        self.max_graphs = max_graphs
        with torch.inference_mode():
            self.ids = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
            self.pos = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
            self.cu = torch.zeros(self.max_seqs + 1, dtype=torch.int32, device=device)
        self.graphs: OrderedDict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]]
        self.graphs = OrderedDict()
        self.mempool: Any = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)
        self.replays = 0
        self.captures = 0
        self.capture_s = 0.0

    def key(self, batch: Batch) -> tuple[int, int, int] | None:
        """The graph key of ``batch``, or None when it does not fit the static buffers."""
        return graph_key(batch, self.max_tokens, self.max_seqs)

    def _load(self, batch: Batch, t_b: int, b_b: int) -> int:
        """Copy ``batch`` into the static inputs, padded to the bucket; the padding length."""
        both, cu = padded_inputs(batch, t_b, b_b, self.max_positions)
        # Fresh pinned blocks each time: the caching host allocator keeps a block until the copy
        # that reads it has run, so a later forward never overwrites an in-flight copy.
        host = torch.from_numpy(both).pin_memory()
        host_cu = torch.from_numpy(cu).pin_memory()
        self.ids[:t_b].copy_(host[0], non_blocking=True)
        self.pos[:t_b].copy_(host[1], non_blocking=True)
        self.cu[: b_b + 1].copy_(host_cu, non_blocking=True)
        return t_b - batch.num_tokens

    def _meta(self, t_b: int, b_b: int, max_len: int) -> AttentionMetadata:
        cu = self.cu[: b_b + 1]
        # Host tuples describe nothing the pooled forward reads (it uses the device tensors);
        # they only have the right length.
        lens = (0,) * b_b
        return AttentionMetadata(cu, cu, max_len, max_len, lens, lens, self.causal)

    def _forward(self, t_b: int, b_b: int, max_len: int) -> torch.Tensor:
        meta = self._meta(t_b, b_b, max_len)
        return self.pooled_forward(self.ids[:t_b], self.pos[:t_b], meta)  # [b_b, hidden]

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor | None:
        """Pooled float32 [B, hidden] of ``batch`` (a fresh tensor), or None when the batch
        does not fit the static buffers (the caller runs it eagerly)."""
        key = self.key(batch)
        if key is None:
            return None
        t_b, b_b, _ = key
        pad = self._load(batch, t_b, b_b)
        max_len = max(batch.max_seqlen, pad)
        b = batch.num_seqs
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            entry[0].replay()
            self.replays += 1
            return entry[1][:b].clone()
        # First forward of this key: eager (compiles, autotunes, runs first-use checks) and
        # its result is the answer; then capture for the next forward of the key.
        out = self._forward(t_b, b_b, max_len)[:b].clone()
        self._capture(key, max_len)
        return out

    def _capture(self, key: tuple[int, int, int], max_len: int) -> None:
        t0 = time.perf_counter()
        t_b, b_b, _ = key
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(
            graph, pool=self.mempool, stream=self.stream, capture_error_mode="thread_local"
        ):
            static_out = self._forward(t_b, b_b, max_len)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.graphs[key] = (graph, static_out)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        logger.debug("captured embedding graph %s in %.3f s", key, time.perf_counter() - t0)

    def stats(self) -> dict[str, Any]:
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "capture_s": round(self.capture_s, 3),
        }
