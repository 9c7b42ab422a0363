"""Paged KV-cache kernels for generation (Triton), written in place like the varlen kernel.

Three ops, registered with ``torch.library`` as mutating ops (``Tensor(a!)``) so that neither
the dispatcher nor ``torch.compile`` adds a defensive copy:

* ``torch.ops.slipstream.paged_store_kv``: scatter the new tokens' K/V into their pages.
* ``torch.ops.slipstream.paged_prefill_attn``: prefill / extend attention. Each sequence's new
  queries attend over its cached prefix (read from pages, visible to every query) plus its new
  tokens (read from the packed ``k``/``v``, causal among themselves). This is the bottom-right
  aligned causal mask of ``flash_attn_varlen`` with ``Lk = prefix + Lq``.
* ``torch.ops.slipstream.paged_decode_attn``: one query per sequence over its pages, with an
  optional split-K along the sequence (``num_splits > 1``): pass 1 writes per-split partial
  results and log-sum-exps to a workspace, pass 2 combines them straight into ``out``. With
  ``num_splits == 1`` pass 1 writes ``out`` directly.

Layouts::

    q:            [T, Hq, D]        any strides, last dim stride 1 (decode: T = B)
    k, v:         [T, Hkv, D]       the new tokens (packed), any strides, last dim stride 1
    out:          [T, Hq, D]        any strides, last dim stride 1
    k_cache:      [num_pages, page_size, Hkv, D]   one layer's pool, last dim stride 1
    v_cache:      [num_pages, page_size, Hkv, D]
    slot_mapping: [T] int64         flat slot page * page_size + offset (< 0: skip)
    page_table:   [B, max_pages] int32
    cu_seqlens_q: [B+1] int32       new tokens of sequence b: rows cu[b]:cu[b+1]
    prefix_lens:  [B] int32         cached tokens of sequence b (already in pages)
    kv_lens:      [B] int32         decode: keys of sequence b in pages, new token included

Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``. Decode handles
the whole group of query heads that share a kv head in one program (one read of each page).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

from slipstream.kernels._library import device_ctx, register_ops

try:  # Triton is optional at import time: the ops are registered either way.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "paged_decode_attn",
    "paged_prefill_attn",
    "paged_store_kv",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_GPU_DTYPES = (torch.float16, torch.bfloat16)
# As for the varlen kernel: fp32 under the interpreter so tests can compare tightly; bf16
# tl.dot is broken in the Triton interpreter, so it is refused there.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535
_MAX_SPLITS = 64

_STORE_SCHEMA = (
    "paged_store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping) -> ()"
)
_PREFILL_SCHEMA = (
    "paged_prefill_attn(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor k_cache, "
    "Tensor v_cache, Tensor page_table, Tensor cu_seqlens_q, Tensor prefix_lens, "
    "SymInt max_seqlen_q, float softmax_scale) -> ()"
)
_DECODE_SCHEMA = (
    "paged_decode_attn(Tensor q, Tensor(a!) out, Tensor k_cache, Tensor v_cache, "
    "Tensor page_table, Tensor kv_lens, int num_splits, float softmax_scale) -> ()"
)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _debug_mode() -> bool:
    return os.environ.get("SLIPSTREAM_DEBUG", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------
# Triton kernels (plain functions until `_build_kernels()` jit-wraps them, so importing this
# module needs no Triton and TRITON_INTERPRET is read at first use).
# ----------------------------------------------------------------------------------------


def _store_kv_kernel(
    K,  # [T, Hkv, D]
    V,  # [T, Hkv, D]
    KC,  # [P, PAGE_SIZE, Hkv, D]
    VC,  # [P, PAGE_SIZE, Hkv, D]
    Slots,  # [T] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per new token: all its kv heads at once (Hkv * D contiguous-ish elements).
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot < 0:
        return
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_h[:, None] < NUM_KV_HEADS
    t64 = t.to(tl.int64)
    k = tl.load(K + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KC + page * stride_kcp + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VC + page * stride_vcp + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VC.dtype.element_ty), mask=mask)


def _paged_prefill_kernel(
    Q,  # [T, Hq, D]
    K,  # [T, Hkv, D] new tokens
    V,  # [T, Hkv, D]
    Out,  # [T, Hq, D]
    KC,  # [P, PAGE_SIZE, Hkv, D]
    VC,
    PageTable,  # [B, max_pages] int32
    cu_seqlens_q,  # [B+1] int32
    PrefixLens,  # [B] int32
    qk_scale,  # softmax_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    stride_pt,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid: (Hq, B, num_m_blocks), the query-block index reversed so the heaviest blocks of the
    # longest sequences start first (as in the varlen kernel).
    head = tl.program_id(0)
    seq = tl.program_id(1)
    start_m = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    prefix_len = tl.load(PrefixLens + seq)
    kv_head = head // GROUP_SIZE

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seqlen_q

    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: alpha never becomes NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1) The cached prefix, gathered from pages. Every prefix key precedes every new query, so
    #    only the tail of the last block needs a mask.
    pt_row = PageTable + seq.to(tl.int64) * stride_pt
    kc_base = KC + kv_head * stride_kch
    vc_base = VC + kv_head * stride_vch
    for start_n in range(0, prefix_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < prefix_len
        pages = tl.load(pt_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        in_page = cols % PAGE_SIZE
        k = tl.load(
            kc_base + pages[None, :] * stride_kcp + in_page[None, :] * stride_kcs
            + offs_d[:, None],
            mask=col_ok[None, :], other=0.0,
        )  # fmt: skip
        qk = tl.dot(q, k)
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            vc_base + pages[:, None] * stride_vcp + in_page[:, None] * stride_vcs
            + offs_d[None, :],
            mask=col_ok[:, None], other=0.0,
        )  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij

    # 2) The new tokens, from the packed k/v (just stored, but reading them here is dense and
    #    needs no page lookup): causal among themselves.
    k_base = K + q_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + q_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    hi = tl.minimum(m0 + BLOCK_M, seqlen_q)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_q
        k = tl.load(
            k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0
        )
        qk = tl.dot(q, k)
        visible = (cols[None, :] <= offs_m[:, None]) & col_ok[None, :]
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_base = Out + q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(Out.dtype.element_ty), mask=row_ok,
    )  # fmt: skip


def _paged_decode_kernel(
    Q,  # [B, Hq, D]
    Out,  # [B, Hq, D] (written when NUM_SPLITS == 1)
    MidO,  # [B, Hq, NUM_SPLITS, D] fp32 (written when NUM_SPLITS > 1)
    MidLse,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    KC,  # [P, PAGE_SIZE, Hkv, D]
    VC,
    PageTable,  # [B, max_pages] int32
    KvLens,  # [B] int32
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    stride_pt,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    # Grid: (B, Hkv, NUM_SPLITS). One program = one kv head's whole query group over one split
    # of the sequence: each page is read once for the group, and the group rows make tl.dot
    # shapes (BLOCK_H >= 16) that use tensor cores.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(KvLens + seq)
    # Splits are sized from the live length (not a capture-time maximum), aligned to BLOCK_N.
    chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_h < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + offs_h

    seq64 = seq.to(tl.int64)
    q = tl.load(
        Q + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_ok[:, None], other=0.0,
    )  # fmt: skip

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)

    pt_row = PageTable + seq64 * stride_pt
    kc_base = KC + kv_head * stride_kch
    vc_base = VC + kv_head * stride_vch
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        pages = tl.load(pt_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        in_page = cols % PAGE_SIZE
        k = tl.load(
            kc_base + pages[None, :] * stride_kcp + in_page[None, :] * stride_kcs
            + offs_d[:, None],
            mask=col_ok[None, :], other=0.0,
        )  # fmt: skip
        qk = tl.dot(q, k)  # [BLOCK_H, BLOCK_N]
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            vc_base + pages[:, None] * stride_vcp + in_page[:, None] * stride_vcs
            + offs_d[None, :],
            mask=col_ok[:, None], other=0.0,
        )  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            Out + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            acc.to(Out.dtype.element_ty), mask=head_ok[:, None],
        )  # fmt: skip
    else:
        # An empty split (short sequence) records lse = -inf: weight 0 in the reduction.
        lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(
            MidO + seq64 * stride_mb + heads[:, None] * stride_mh + split * stride_ms
            + offs_d[None, :],
            acc, mask=head_ok[:, None],
        )  # fmt: skip
        tl.store(MidLse + seq64 * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


def _decode_reduce_kernel(
    MidO,  # [B, Hq, NUM_SPLITS, D] fp32
    MidLse,  # [B, Hq, NUM_SPLITS] fp32
    Out,  # [B, Hq, D]
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid: (B, Hq). Combines the per-split softmax results with their log-sum-exps.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(MidLse + seq * stride_lb + head * stride_lh + offs_s, mask=s_ok,
                  other=float("-inf"))  # fmt: skip
    m = tl.max(lse, 0)  # finite: split 0 always holds at least one key
    w = tl.math.exp2(lse - m)
    o = tl.load(
        MidO + seq * stride_mb + head * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=s_ok[:, None], other=0.0,
    )  # fmt: skip
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty))


_KERNEL_NAMES = (
    "_store_kv_kernel",
    "_paged_prefill_kernel",
    "_paged_decode_kernel",
    "_decode_reduce_kernel",
)


@functools.cache
def _build_kernels() -> dict[str, Any]:
    """jit-wrap the kernels on first use."""
    if triton is None:
        raise RuntimeError(
            "slipstream paged attention kernels need Triton, which failed to import: "
            f"{_TRITON_IMPORT_ERROR!r}"
        )
    g = globals()
    for name in _KERNEL_NAMES:
        if not isinstance(g[name], triton.runtime.JITFunction):
            g[name] = triton.jit(g[name])
    return {name: g[name] for name in _KERNEL_NAMES}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _prefill_blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Fixed, not autotuned: the kernel runs once per
    layer per prefill step and its shapes vary every step (autotuning would re-run per key)."""
    if _interpret_mode():
        return 16, 16, 4, 1
    if head_dim <= 64:
        return 64, 64, 4, 2
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 64, 32, 4, 2


def _decode_blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the decode kernel (fixed: CUDA graphs capture it)."""
    if _interpret_mode():
        return 16, 4, 1
    if head_dim <= 128:
        return 64, 4, 2
    return 32, 4, 2


# ----------------------------------------------------------------------------------------
# Argument checks: metadata only (no reads, no sync) unless on CPU or SLIPSTREAM_DEBUG=1
# ----------------------------------------------------------------------------------------


def _check_tensor(name: str, t: Any, dim: int, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t)}")
    if t.dim() != dim:
        raise ValueError(f"{op}: `{name}` must be {dim}-D, got shape {tuple(t.shape)}")


def _check_last_stride(op: str, **named: torch.Tensor) -> None:
    for name, t in named.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{op}: last dim of `{name}` must have stride 1, got strides {tuple(t.stride())}"
            )


def _check_device(op: str, **named: torch.Tensor) -> None:
    first = next(iter(named.values())).device
    for name, t in named.items():
        if t.device != first:
            raise ValueError(f"{op}: all tensors must be on one device; `{name}` is on {t.device}")
    if first.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {first}")


def _check_compute_dtype(op: str, t: torch.Tensor) -> None:
    allowed = _GPU_DTYPES if t.device.type == "cuda" else _INTERPRETER_DTYPES
    if t.dtype not in allowed:
        raise TypeError(
            f"{op}: dtype {t.dtype} not supported on {t.device.type}; "
            f"supported: {[str(d) for d in allowed]}"
        )


def _check_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, hkv: int, d: int) -> None:
    _check_tensor("k_cache", k_cache, 4, op)
    _check_tensor("v_cache", v_cache, 4, op)
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(
            f"{op}: `k_cache` {tuple(k_cache.shape)} and `v_cache` {tuple(v_cache.shape)} differ"
        )
    if k_cache.shape[2] != hkv or k_cache.shape[3] != d:
        raise ValueError(
            f"{op}: cache shape {tuple(k_cache.shape)} does not match [pages, page_size, {hkv}, "
            f"{d}]"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{op}: `k_cache` and `v_cache` dtypes differ")


def _check_int_vector(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    _check_tensor(name, t, 1, op)
    if t.dtype != dtype:
        raise TypeError(f"{op}: `{name}` must be {dtype}, got {t.dtype}")
    if t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: `{name}` must be contiguous")


def _check_page_table(op: str, page_table: torch.Tensor, batch: int) -> None:
    _check_tensor("page_table", page_table, 2, op)
    if page_table.dtype != torch.int32:
        raise TypeError(f"{op}: `page_table` must be int32, got {page_table.dtype}")
    if page_table.shape[0] != batch:
        raise ValueError(
            f"{op}: `page_table` has {page_table.shape[0]} rows for a batch of {batch}"
        )
    if page_table.shape[1] > 1 and page_table.stride(1) != 1:
        raise ValueError(f"{op}: `page_table` rows must be contiguous")


def _check_pages_values(
    op: str, page_table: torch.Tensor, lens: torch.Tensor, num_pages: int, page_size: int
) -> None:
    """Data checks (a device sync on CUDA): lengths fit the table, pages exist."""
    lens_c = lens.detach().to("cpu", torch.int64)
    pt = page_table.detach().to("cpu", torch.int64)
    if lens_c.numel() and int(lens_c.min()) < 0:
        raise ValueError(f"{op}: negative sequence length")
    need = (lens_c + page_size - 1) // page_size
    if need.numel() and int(need.max()) > pt.shape[1]:
        raise ValueError(
            f"{op}: a sequence needs {int(need.max())} pages but `page_table` has "
            f"{pt.shape[1]} columns"
        )
    for b in range(pt.shape[0]):
        used = pt[b, : int(need[b])]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"{op}: page id out of [0, {num_pages}) in row {b} of `page_table`")


def _prep_launch(op: str, device: torch.device) -> None:
    if device.type == "cpu" and not _interpret_mode():
        raise RuntimeError(
            f"{op}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before the "
            "first call)"
        )


def _check_store(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    op = "paged_store_kv"
    _check_tensor("k", k, 3, op)
    _check_tensor("v", v, 3, op)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{op}: `k` {tuple(k.shape)} and `v` {tuple(v.shape)} differ")
    _check_cache(op, k_cache, v_cache, k.shape[1], k.shape[2])
    _check_int_vector(op, "slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(
            f"{op}: `slot_mapping` has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens"
        )
    if k.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{op}: unsupported head_dim {k.shape[2]}; supported {SUPPORTED_HEAD_DIMS}"
        )
    _check_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _check_last_stride(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache)


def _check_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_seqlen_q: Any,
    softmax_scale: float,
) -> None:
    op = "paged_prefill_attn"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check_tensor(name, t, 3, op)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"{op}: `out` shape {tuple(out.shape)} must equal q's {tuple(q.shape)}")
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != q.shape[0] or k.shape[2] != d:
        raise ValueError(
            f"{op}: `k` {tuple(k.shape)} / `v` {tuple(v.shape)} must be [T={q.shape[0]}, Hkv, {d}]"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: unsupported head_dim {d}; supported {SUPPORTED_HEAD_DIMS}")
    _check_cache(op, k_cache, v_cache, hkv, d)
    for name, t in (("k", k), ("v", v), ("out", out), ("k_cache", k_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` dtype {t.dtype} differs from q's {q.dtype}")
    _check_int_vector(op, "cu_seqlens_q", cu_seqlens_q, torch.int32)
    _check_int_vector(op, "prefix_lens", prefix_lens, torch.int32)
    batch = cu_seqlens_q.shape[0] - 1
    if prefix_lens.shape[0] != batch:
        raise ValueError(f"{op}: `prefix_lens` has {prefix_lens.shape[0]} entries, batch {batch}")
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"{op}: at most {_MAX_GRID_YZ} sequences per call, got {batch}")
    _check_page_table(op, page_table, batch)
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, (int, torch.SymInt)):
        raise TypeError(f"{op}: `max_seqlen_q` must be an int, got {type(max_seqlen_q)}")
    if not (math.isfinite(float(softmax_scale)) and float(softmax_scale) > 0):
        raise ValueError(f"{op}: `softmax_scale` must be finite and > 0, got {softmax_scale}")
    _check_device(
        op, q=q, k=k, v=v, out=out, k_cache=k_cache, v_cache=v_cache, page_table=page_table,
        cu_seqlens_q=cu_seqlens_q, prefix_lens=prefix_lens,
    )  # fmt: skip
    _check_last_stride(op, q=q, k=k, v=v, out=out, k_cache=k_cache, v_cache=v_cache)


def _check_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    num_splits: int,
    softmax_scale: float,
) -> None:
    op = "paged_decode_attn"
    _check_tensor("q", q, 3, op)
    _check_tensor("out", out, 3, op)
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"{op}: `out` shape {tuple(out.shape)} must equal q's {tuple(q.shape)}")
    b, hq, d = q.shape
    _check_tensor("k_cache", k_cache, 4, op)
    hkv = k_cache.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: unsupported head_dim {d}; supported {SUPPORTED_HEAD_DIMS}")
    _check_cache(op, k_cache, v_cache, hkv, d)
    for name, t in (("out", out), ("k_cache", k_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` dtype {t.dtype} differs from q's {q.dtype}")
    _check_int_vector(op, "kv_lens", kv_lens, torch.int32)
    if kv_lens.shape[0] != b:
        raise ValueError(f"{op}: `kv_lens` has {kv_lens.shape[0]} entries for a batch of {b}")
    _check_page_table(op, page_table, b)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"{op}: `num_splits` must be an int, got {type(num_splits)}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"{op}: `num_splits` must be in [1, {_MAX_SPLITS}], got {num_splits}")
    if not (math.isfinite(float(softmax_scale)) and float(softmax_scale) > 0):
        raise ValueError(f"{op}: `softmax_scale` must be finite and > 0, got {softmax_scale}")
    _check_device(
        op, q=q, out=out, k_cache=k_cache, v_cache=v_cache, page_table=page_table, kv_lens=kv_lens
    )
    _check_last_stride(op, q=q, out=out, k_cache=k_cache, v_cache=v_cache)


# ----------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------


def _store_impl(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    _prep_launch("paged_store_kv", k.device)
    _check_compute_dtype("paged_store_kv", k_cache)
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    if k.device.type == "cpu" or _debug_mode():
        s = slot_mapping.detach().to("cpu")
        if s.numel() and int(s.max()) >= n_slots:
            raise ValueError(f"paged_store_kv: slot {int(s.max())} out of range [0, {n_slots})")
    t = k.shape[0]
    if t == 0:
        return
    kern = _build_kernels()["_store_kv_kernel"]
    with device_ctx(k.device):
        kern[(t,)](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k.shape[1],
            PAGE_SIZE=k_cache.shape[1], HEAD_DIM=k.shape[2], BLOCK_H=_next_pow2(k.shape[1]),
            num_warps=1 if k.shape[1] * k.shape[2] <= 256 else 4,
        )  # fmt: skip


def _prefill_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
) -> None:
    op = "paged_prefill_attn"
    _check_prefill(
        q, k, v, out, k_cache, v_cache, page_table, cu_seqlens_q, prefix_lens, max_seqlen_q,
        softmax_scale,
    )  # fmt: skip
    _prep_launch(op, q.device)
    _check_compute_dtype(op, q)
    batch = cu_seqlens_q.shape[0] - 1
    if q.device.type == "cpu" or _debug_mode():
        cu = cu_seqlens_q.detach().to("cpu", torch.int64)
        lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or (lens.numel() and int(lens.min()) < 0):
            raise ValueError(f"{op}: `cu_seqlens_q` must run from 0 to T={q.shape[0]}")
        if lens.numel() and int(lens.max()) > int(max_seqlen_q):
            raise ValueError(f"{op}: a sequence is longer than `max_seqlen_q`={max_seqlen_q}")
        _check_pages_values(op, page_table, prefix_lens, k_cache.shape[0], k_cache.shape[1])
    if batch == 0 or q.shape[0] == 0 or int(max_seqlen_q) == 0:
        return
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    block_m, block_n, warps, stages = _prefill_blocks(d)
    grid = (hq, batch, triton.cdiv(int(max_seqlen_q), block_m))
    kern = _build_kernels()["_paged_prefill_kernel"]
    with device_ctx(q.device):
        kern[grid](
            q, k, v, out, k_cache, v_cache, page_table, cu_seqlens_q, prefix_lens,
            float(softmax_scale) * _LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0),
            GROUP_SIZE=hq // hkv, HEAD_DIM=d, PAGE_SIZE=k_cache.shape[1],
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip


def _decode_impl(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    num_splits: int,
    softmax_scale: float,
) -> None:
    op = "paged_decode_attn"
    _check_decode(q, out, k_cache, v_cache, page_table, kv_lens, num_splits, softmax_scale)
    _prep_launch(op, q.device)
    _check_compute_dtype(op, q)
    if q.device.type == "cpu" or _debug_mode():
        lens = kv_lens.detach().to("cpu")
        if lens.numel() and int(lens.min()) < 1:
            raise ValueError(f"{op}: every sequence needs at least one key (`kv_lens` >= 1)")
        _check_pages_values(op, page_table, kv_lens, k_cache.shape[0], k_cache.shape[1])
    b, hq, d = q.shape
    if b == 0:
        return
    hkv = k_cache.shape[2]
    group = hq // hkv
    block_n, warps, stages = _decode_blocks(d)
    kernels = _build_kernels()
    splits = int(num_splits)
    if splits > 1:
        # Workspace for the partial results; under a CUDA graph it comes from the graph's pool.
        mid_o = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = out  # unused by the kernel (NUM_SPLITS == 1 branch); any pointer will do
        mid_lse = kv_lens
    with device_ctx(q.device):
        kernels["_paged_decode_kernel"][(b, hkv, splits)](
            q, out, mid_o, mid_lse, k_cache, v_cache, page_table, kv_lens,
            float(softmax_scale) * _LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            mid_o.stride(0) if splits > 1 else 0, mid_o.stride(1) if splits > 1 else 0,
            mid_o.stride(2) if splits > 1 else 0,
            mid_lse.stride(0) if splits > 1 else 0, mid_lse.stride(1) if splits > 1 else 0,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0),
            GROUP_SIZE=group, HEAD_DIM=d, PAGE_SIZE=k_cache.shape[1],
            BLOCK_H=max(16, _next_pow2(group)), BLOCK_N=block_n, NUM_SPLITS=splits,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if splits > 1:
            kernels["_decode_reduce_kernel"][(b, hq)](
                mid_o, mid_lse, out,
                mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
                mid_lse.stride(0), mid_lse.stride(1),
                out.stride(0), out.stride(1),
                NUM_SPLITS=splits, HEAD_DIM=d, BLOCK_S=_next_pow2(splits),
                num_warps=1 if d <= 64 else 4,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------
# torch.library registration (same style as flash_attn_varlen)
# ----------------------------------------------------------------------------------------


def _store_fake(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _check_store(k, v, k_cache, v_cache, slot_mapping)


def _prefill_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
) -> None:
    _check_prefill(
        q, k, v, out, k_cache, v_cache, page_table, cu_seqlens_q, prefix_lens, max_seqlen_q,
        softmax_scale,
    )  # fmt: skip


def _decode_fake(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    num_splits: int,
    softmax_scale: float,
) -> None:
    _check_decode(q, out, k_cache, v_cache, page_table, kv_lens, num_splits, softmax_scale)


_OPS: tuple[tuple[str, str, Any, Any], ...] = (
    ("paged_store_kv", _STORE_SCHEMA, _store_impl, _store_fake),
    ("paged_prefill_attn", _PREFILL_SCHEMA, _prefill_impl, _prefill_fake),
    ("paged_decode_attn", _DECODE_SCHEMA, _decode_impl, _decode_fake),
)


# Keep the Library alive (its registrations die with it); importlib.reload keeps the old one.
_LIB: torch.library.Library | None = globals().get("_LIB")
if _LIB is None:
    _LIB = register_ops(_OPS)


# ----------------------------------------------------------------------------------------
# Public wrappers
# ----------------------------------------------------------------------------------------


def paged_store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [T] int64, < 0 skips the token
) -> None:
    """Store each new token's K/V at its slot of the paged pool."""
    torch.ops.slipstream.paged_store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_prefill_attn(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D] new tokens
    v: torch.Tensor,  # [T, Hkv, D]
    out: torch.Tensor,  # [T, Hq, D], written in place
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    prefix_lens: torch.Tensor,  # [B] int32
    max_seqlen_q: int,
    softmax_scale: float | None = None,
) -> None:
    """Extend attention: new queries over (cached prefix from pages + new tokens, causal)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    torch.ops.slipstream.paged_prefill_attn(
        q, k, v, out, k_cache, v_cache, page_table, cu_seqlens_q, prefix_lens,
        int(max_seqlen_q), scale,
    )  # fmt: skip


def paged_decode_attn(
    q: torch.Tensor,  # [B, Hq, D]
    out: torch.Tensor,  # [B, Hq, D], written in place
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D] (new token already stored)
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    kv_lens: torch.Tensor,  # [B] int32, >= 1
    num_splits: int = 1,
    softmax_scale: float | None = None,
) -> None:
    """Decode attention over pages; ``num_splits > 1`` splits each sequence (split-K)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    torch.ops.slipstream.paged_decode_attn(
        q, out, k_cache, v_cache, page_table, kv_lens, int(num_splits), scale
    )
