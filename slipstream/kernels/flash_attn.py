"""Variable-length packed flash attention (forward only) as a Triton kernel.

The kernel reads ``q``/``k``/``v`` through their strides and writes the result straight
into the ``out`` tensor it is handed: no ``.contiguous()``, no temporary output, no copy.
That is why ``out`` is an argument rather than a return value, and why the op is
registered with a ``Tensor(a!) out`` schema and a fake implementation that allocates
nothing: neither the dispatcher nor ``torch.compile`` has a reason to add a copy.

Layout (packed, no padding)::

    q:            [T_q, Hq, D]    any strides, last dim stride 1
    k, v:         [T_k, Hkv, D]   any strides, last dim stride 1
    out:          [T_q, Hq, D]    any strides, last dim stride 1
    cu_seqlens_q: [B+1] int32     sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    cu_seqlens_k: [B+1] int32     same for keys/values

Semantics:

* Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
* ``causal=True`` aligns the mask bottom-right, like flash-attn: query ``i`` of a sequence
  with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``. With ``Lq == Lk`` this is
  ordinary causal attention; with ``Lk > Lq`` it is prefill over a cached prefix.
* A query row that sees no key at all (``Lk == 0``, or ``Lk < Lq`` with causal) is written as
  zeros rather than NaN. Callers should normally have ``Lk >= Lq >= 1``.
* ``cu_seqlens_q[-1]`` must equal ``T_q`` (so every row of ``out`` is written);
  ``cu_seqlens_k[-1]`` may be smaller than ``T_k`` (spare room in a key/value buffer is fine).
* Rows and columns of the buffer behind ``out`` that are not part of the view are never written.

Limits: ``seqlen * row_stride`` of every tensor must stay below 2**31 elements (per-sequence offsets
are 32-bit; the per-sequence base offset is 64-bit, so the total buffer may be larger).

Launch: on CUDA the config is autotuned per (head_dim, causal, dtype, power-of-two buckets of
max_seqlen_q/k) on first use (results cached on disk by Triton), so warm up before capturing a
CUDA graph. Environment knobs (read per call):

* ``SLIPSTREAM_FLASH_AUTOTUNE=0``: no autotuning, use the first config of the head_dim's list.
* ``SLIPSTREAM_FLASH_CONFIG=BLOCK_M,BLOCK_N,num_warps,num_stages``: force one config.
* ``SLIPSTREAM_DEBUG=1``: also check the values of cu_seqlens on CUDA (a device sync).
* ``SLIPSTREAM_FLASH_VARIANT=base|wide|gqa_pack``: kernel variant (see ``VARIANTS``; default
  ``gqa_pack``, the fastest in benchmarks/results/attention_variants_h100.json). ``wide``: same kernel, wider autotune space. ``gqa_pack``: the query heads that
  share a kv head are stacked into one Q tile, so each K/V tile load serves all of them.
* ``SLIPSTREAM_FLASH_WS=1``: Triton's automatic warp specialisation of the unmasked key loop
  (``tl.range(..., warp_specialize=True)``); for A/B runs, off by default (see
  docs/performance.md for the measurement).

The Python wrapper launches directly in plain eager mode (saves ~10 us of dispatcher boxing
per call) and goes through ``torch.ops.slipstream.flash_attn_varlen`` whenever something is
tracing (torch.compile, make_fx, export), a tensor subclass / Python mode or a functorch
transform (vmap, functionalize) is active, or the profiler is running (so profiles show the op
as a named region); `kernels/_library.eager_direct_ok` decides, for the fused ops too.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import types
from typing import Any

import torch

from slipstream.kernels._library import device_ctx, eager_direct_ok

_log = logging.getLogger(__name__)

try:  # Triton is optional at import time: the op is still registered without it.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = exc

__all__ = ["SUPPORTED_HEAD_DIMS", "flash_attn_varlen", "triton_available"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_GPU_DTYPES = (torch.float16, torch.bfloat16)
# The interpreter (CPU tests) also takes fp32 so tests can compare at 1e-4; bf16 tl.dot is
# broken in the Triton interpreter (garbage results in 3.9), so it is refused there.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
_LOG2E = 1.4426950408889634

_OP_QUALNAME = "slipstream::flash_attn_varlen"
_OP_SCHEMA = (
    "flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal=True, "
    "float? softmax_scale=None, Tensor? q_norm_weight=None, Tensor? cos=None, Tensor? sin=None, "
    "float q_norm_eps=1e-06) -> ()"
)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _debug_mode() -> bool:
    return os.environ.get("SLIPSTREAM_DEBUG", "0") not in ("", "0")


def triton_available() -> bool:
    """True if Triton imports and a kernel can run (CUDA present, or TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpret_mode()


# ----------------------------------------------------------------------------------------
# Triton kernel. The functions below are plain Python until `_build_kernels()` wraps them
# with `triton.jit`; decorating lazily means importing this module never requires Triton
# and TRITON_INTERPRET is read at first use rather than at import time.
# ----------------------------------------------------------------------------------------


def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,  # [BLOCK_M, HEAD_DIM]
    k_ptrs,  # [HEAD_DIM, BLOCK_N] pointers to key block 0 (transposed view)
    v_ptrs,  # [BLOCK_N, HEAD_DIM] pointers to value block 0
    stride_kt,
    stride_vt,
    offs_m,  # [BLOCK_M] query positions within the sequence
    offs_n,  # [BLOCK_N]
    lo,
    hi,
    seqlen_k,
    causal_shift,  # seqlen_k - seqlen_q (bottom-right alignment)
    qk_scale,  # softmax_scale * log2(e)
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    WS: tl.constexpr = False,
):
    # One pass over key blocks [lo, hi). MASKED=False is the hot loop: every key in range is
    # valid and visible to every query row, so loads and scores need no mask at all.
    # WS: Triton's automatic warp specialisation of the loop (SLIPSTREAM_FLASH_WS=1, A/B only).
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < seqlen_k, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        qk = tl.dot(q, k)  # fp32 accumulate
        if MASKED:
            if CAUSAL:
                # For real rows (offs_m < seqlen_q) this also implies cols < seqlen_k.
                visible = cols[None, :] <= offs_m[:, None] + causal_shift
            else:
                visible = cols[None, :] < seqlen_k
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            # qk_scale > 0 (checked by the wrapper), so max(qk) * scale == max(qk * scale)
            # and the scale folds into one FMA per element.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        # m_i starts at a finite -1e30 (not -inf), so alpha is never exp2(-inf - -inf) = NaN.
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < seqlen_k, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        # P in the input dtype for the second GEMM (tensor-core path), accumulate in fp32.
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


def _load_q_norm_rope(
    row_ptrs,  # [BLOCK_M] pointers to element 0 of each row's query head
    cos_rows,  # [BLOCK_M] pointers to each row's cos row ([D/2]: NeoX halves are equal)
    sin_rows,  # [BLOCK_M] pointers to each row's sin row
    row_ok,  # [BLOCK_M, 1]
    QW,  # [D] q_norm weight
    q_eps,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # The Q tile with Qwen3's per-head q RMSNorm and NeoX rotary applied on the way in, so the
    # query never makes a round trip through memory between the qkv projection and attention.
    # Same float32 math and the same rounding to the input dtype after every step as
    # kernels/fused.py's `_qk_norm_rope_kernel` (and the unfused torch expressions), so the
    # tile holds exactly the values that kernel would have stored.
    dt = row_ptrs.dtype.element_ty
    d = tl.arange(0, HEAD_DIM // 2)
    d2 = d + HEAD_DIM // 2
    x1 = tl.load(row_ptrs[:, None] + d[None, :], mask=row_ok, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptrs[:, None] + d2[None, :], mask=row_ok, other=0.0).to(tl.float32)
    var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
    rstd = tl.rsqrt(var + q_eps)[:, None]
    w1 = tl.load(QW + d).to(tl.float32)[None, :]
    w2 = tl.load(QW + d2).to(tl.float32)[None, :]
    n1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
    n2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    # Half-width tables (cos(p * f_i) for i < D/2: both halves of a NeoX table are equal), cast
    # to the input dtype first as RotaryEmbedding.rotate does: a quarter of the bytes of the
    # float32 [T, D] tables, read once per Q tile.
    c = tl.load(cos_rows[:, None] + d[None, :], mask=row_ok, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_rows[:, None] + d[None, :], mask=row_ok, other=0.0).to(dt).to(tl.float32)
    o1 = ((n1 * c).to(dt).to(tl.float32) + (-(n2 * s)).to(dt).to(tl.float32)).to(dt)
    o2 = ((n2 * c).to(dt).to(tl.float32) + (n1 * s).to(dt).to(tl.float32)).to(dt)
    # [BLOCK_M, D/2, 2] -> [BLOCK_M, 2, D/2] -> [BLOCK_M, D]: the two halves side by side.
    return tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), (BLOCK_M, HEAD_DIM))


def _flash_attn_varlen_fwd_kernel(
    Q,  # [T_q, Hq, D]
    K,  # [T_k, Hkv, D]
    V,  # [T_k, Hkv, D]
    Out,  # [T_q, Hq, D]
    cu_seqlens_q,  # [B+1] int32
    cu_seqlens_k,  # [B+1] int32
    qk_scale,  # fp32: softmax_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    batch,  # B
    num_heads_q,  # Hq
    group_size,  # Hq // Hkv (runtime: a constexpr would recompile every config per GQA ratio)
    QW,  # [D] q_norm weight (Q_ROPE only)
    COS,  # [T_q, D/2] (Q_ROPE only)
    SIN,  # [T_q, D/2] (Q_ROPE only)
    stride_cos,
    stride_sin,
    q_eps,
    SEQ_BUCKET_Q,  # not used in the body: autotune key only
    SEQ_BUCKET_K,  # not used in the body: autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WS: tl.constexpr = False,  # warp-specialised hot loop (A/B, SLIPSTREAM_FLASH_WS=1)
    Q_ROPE: tl.constexpr = False,  # q RMSNorm + rotary applied while loading the Q tile
):
    # 1-D grid of num_heads_q * NV programs over "virtual" query blocks. Sequence b owns the
    # virtual blocks [cu_q[b] // BLOCK_M + b, cu_q[b+1] // BLOCK_M + b + 1): at least
    # cdiv(Lq_b, BLOCK_M) of them and at most one spare, so NV = T_q // BLOCK_M + B is exact
    # and almost no program is launched just to exit (a (head, seq, max_blocks) grid would
    # launch B * max_blocks programs per head, mostly empty ones for a mixed batch).
    # The head index varies fastest, so the query heads sharing one kv head run side by side
    # (L2 reuse of K/V), and the virtual index is reversed so that within each sequence the
    # last query blocks (the heaviest ones, for causal) are scheduled first.
    pid = tl.program_id(0)
    head = pid % num_heads_q
    num_virtual = tl.num_programs(0) // num_heads_q
    vblock = num_virtual - 1 - pid // num_heads_q

    # Binary search for the sequence owning `vblock`: the last b with
    # cu_q[b] // BLOCK_M + b <= vblock (that start is non-decreasing in b).
    zero = pid * 0  # loop-carried values must be int32 tensors, not Python ints
    lo = zero
    hi = zero + batch
    while lo < hi:
        mid = (lo + hi) // 2
        go_right = tl.load(cu_seqlens_q + mid) // BLOCK_M + mid <= vblock
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1

    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = (vblock - (q_start // BLOCK_M + seq)) * BLOCK_M
    if m0 >= seqlen_q:
        return  # spare virtual block of this sequence: nothing to do
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    kv_head = head // group_size

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seqlen_q

    # 64-bit per-sequence base offsets; in-sequence offsets stay 32-bit (cheaper).
    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    o_base = Out + q_start.to(tl.int64) * stride_ot + head * stride_oh

    if Q_ROPE:
        cs_row = q_start.to(tl.int64) + offs_m
        q = _load_q_norm_rope(
            q_base + offs_m * stride_qt, COS + cs_row * stride_cos, SIN + cs_row * stride_sin,
            row_ok, QW, q_eps, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM,
        )  # fmt: skip
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok, other=0.0)
    k_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        causal_shift = seqlen_k - seqlen_q
        # Keys < m0 + causal_shift + 1 are visible to every row of this block (and < seqlen_k
        # because m0 < seqlen_q): those whole blocks go through the unmasked loop. Blocks
        # entirely above the diagonal (>= m0 + BLOCK_M + causal_shift) are skipped.
        full_hi = tl.maximum(m0 + causal_shift + 1, 0) // BLOCK_N * BLOCK_N
        masked_hi = tl.minimum(m0 + BLOCK_M + causal_shift, seqlen_k)
    else:
        causal_shift = 0
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        masked_hi = seqlen_k

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
        0, full_hi, seqlen_k, causal_shift, qk_scale,
        BLOCK_N=BLOCK_N, MASKED=False, CAUSAL=CAUSAL, WS=WS,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
        full_hi, masked_hi, seqlen_k, causal_shift, qk_scale,
        BLOCK_N=BLOCK_N, MASKED=True, CAUSAL=CAUSAL,
    )  # fmt: skip

    # Rows that saw no key have l_i == 0 and acc == 0: write zeros, not 0/0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok)


def _flash_attn_varlen_fwd_packed_kernel(
    Q,  # [T_q, Hq, D]
    K,  # [T_k, Hkv, D]
    V,  # [T_k, Hkv, D]
    Out,  # [T_q, Hq, D]
    cu_seqlens_q,  # [B+1] int32
    cu_seqlens_k,  # [B+1] int32
    qk_scale,  # fp32: softmax_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    batch,  # B
    num_heads_q,  # Hq
    group_size,  # Hq // Hkv
    QW,  # [D] q_norm weight (Q_ROPE only)
    COS,  # [T_q, D/2] (Q_ROPE only)
    SIN,  # [T_q, D/2] (Q_ROPE only)
    stride_cos,
    stride_sin,
    q_eps,
    SEQ_BUCKET_Q,  # not used in the body: autotune key only
    SEQ_BUCKET_K,  # not used in the body: autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of the Q tile = PACK heads x (BLOCK_M // PACK) positions
    BLOCK_N: tl.constexpr,
    PACK: tl.constexpr,  # query heads (sharing one kv head) stacked into one Q tile
    WS: tl.constexpr = False,  # warp-specialised hot loop (A/B, SLIPSTREAM_FLASH_WS=1)
    Q_ROPE: tl.constexpr = False,  # q RMSNorm + rotary applied while loading the Q tile
):
    # Variant "gqa_pack": like the base kernel, but one program owns PACK query heads that read
    # the same kv head (PACK divides group_size). Their rows are stacked into one Q tile,
    # position-major: row r is position m0 + r // PACK of head head0 + r % PACK, so each K/V
    # tile loaded into shared memory feeds PACK heads (K/V traffic per FLOP / PACK at equal
    # positions per block, or the same traffic with PACK x fewer positions per block, which
    # shrinks the masked diagonal work for causal). Grid and ordering as in the base kernel,
    # over Hq // PACK head groups and virtual blocks of BLOCK_MP positions.
    BLOCK_MP: tl.constexpr = BLOCK_M // PACK
    pid = tl.program_id(0)
    num_groups = num_heads_q // PACK
    hgroup = pid % num_groups
    num_virtual = tl.num_programs(0) // num_groups
    vblock = num_virtual - 1 - pid // num_groups

    zero = pid * 0
    lo = zero
    hi = zero + batch
    while lo < hi:
        mid = (lo + hi) // 2
        go_right = tl.load(cu_seqlens_q + mid) // BLOCK_MP + mid <= vblock
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1

    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = (vblock - (q_start // BLOCK_MP + seq)) * BLOCK_MP
    if m0 >= seqlen_q:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    head0 = hgroup * PACK
    kv_head = head0 // group_size

    rows = tl.arange(0, BLOCK_M)
    pos_m = m0 + rows // PACK  # [BLOCK_M] query position of each stacked row
    head_r = rows % PACK  # [BLOCK_M] head offset (within the pack) of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = pos_m[:, None] < seqlen_q

    q_base = Q + q_start.to(tl.int64) * stride_qt + head0 * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    o_base = Out + q_start.to(tl.int64) * stride_ot + head0 * stride_oh

    q_rows = pos_m * stride_qt + head_r * stride_qh
    if Q_ROPE:
        cs_row = q_start.to(tl.int64) + pos_m
        q = _load_q_norm_rope(
            q_base + q_rows, COS + cs_row * stride_cos, SIN + cs_row * stride_sin,
            row_ok, QW, q_eps, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM,
        )  # fmt: skip
    else:
        q = tl.load(q_base + q_rows[:, None] + offs_d[None, :], mask=row_ok, other=0.0)
    k_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        causal_shift = seqlen_k - seqlen_q
        full_hi = tl.maximum(m0 + causal_shift + 1, 0) // BLOCK_N * BLOCK_N
        masked_hi = tl.minimum(m0 + BLOCK_MP + causal_shift, seqlen_k)
    else:
        causal_shift = 0
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        masked_hi = seqlen_k

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, pos_m, offs_n,
        0, full_hi, seqlen_k, causal_shift, qk_scale,
        BLOCK_N=BLOCK_N, MASKED=False, CAUSAL=CAUSAL, WS=WS,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, pos_m, offs_n,
        full_hi, masked_hi, seqlen_k, causal_shift, qk_scale,
        BLOCK_N=BLOCK_N, MASKED=True, CAUSAL=CAUSAL,
    )  # fmt: skip

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_rows = pos_m * stride_ot + head_r * stride_oh
    tl.store(o_base + o_rows[:, None] + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=row_ok)


# Autotune candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages). All of them compile for
# sm_90a with Triton 3.6 and fit H100 shared memory (largest: 224 KiB for D=128 128x128x3) with
# no register spills; on GPUs with less shared memory the autotuner skips those that do not
# fit (OutOfResources -> infinite time).
_CONFIGS_BY_HEAD_DIM: dict[int, list[tuple[int, int, int, int]]] = {
    # The first entry of each list is the fixed config used when autotuning is off.
    256: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
    128: [
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
    ],
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
}
_CONFIGS_BY_HEAD_DIM[16] = _CONFIGS_BY_HEAD_DIM[32]

# ----------------------------------------------------------------------------------------
# Variants (A/B testing). SLIPSTREAM_FLASH_VARIANT (read per call) or `variant=` picks one:
#
# * ``base``: the kernel and autotune list above.
# * ``wide``: the same kernel, a wider autotune space (more stage counts, BLOCK_N 32 with 4 or
#   8 warps), pruned by the max_seqlen buckets. (64x128 tiles on 4 warps were left out: they
#   spill ~100 bytes per thread on sm_90a with Triton 3.6.)
# * ``gqa_pack``: `_flash_attn_varlen_fwd_packed_kernel`: PACK query heads of one kv head
#   stacked into one Q tile (BLOCK_M rows = PACK heads x BLOCK_M // PACK positions), with its
#   own autotune space including 256-row tiles (128 positions x 2 heads) on 16 warps.
# * ``sm90_ws``: the Gluon producer/consumer kernel of `flash_attn_sm90.py` (Hopper only:
#   TMA producer warp, two consumer warpgroups, softmax overlapped with the tensor cores).
#   The default for batches with a sequence over 1024 tokens (`sm90_pays_off`); shorter
#   batches and calls it cannot run (see `flash_attn_sm90.supported`, and every call with an
#   explicit `config`, and the interpreter) fall back to `_fallback_variant`.
# ----------------------------------------------------------------------------------------

VARIANTS = ("base", "wide", "gqa_pack", "sm90_ws")
# Default: the Gluon kernel where it can run (Hopper, head_dim 128, an even GQA group,
# self-attention; 1.13-1.26x gqa_pack on the H100, attention_sm90_h100.json) and the batch has
# a sequence over 1024 tokens (`sm90_pays_off`), else
# `_fallback_variant`: gqa_pack, or base for one causal sequence (the earlier H100 A/B,
# benchmarks/results/attention_variants_h100.json: gqa_pack was 1.00x base on one causal
# 7168-token sequence and 1.04x on the packed mixed batch; attention_bench_h100.json: base
# 4% ahead on the single causal sequence).
_DEFAULT_VARIANT = "sm90_ws"

# Extra candidates of the `wide` variant (added to the base list of the head_dim).
_WIDE_EXTRA: dict[int, list[tuple[int, int, int, int]]] = {
    256: [(128, 32, 8, 2), (64, 32, 4, 2)],
    128: [
        (128, 64, 8, 2),
        (128, 64, 8, 5),
        (128, 32, 4, 3),
        (128, 32, 8, 4),
        (128, 32, 8, 3),
        (64, 64, 4, 2),
    ],
    64: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4)],
    32: [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3)],
}
_WIDE_EXTRA[16] = _WIDE_EXTRA[32]

# `gqa_pack`: BLOCK_M counts stacked rows (PACK heads x BLOCK_M // PACK positions).
_PACK_CONFIGS_BY_HEAD_DIM: dict[int, list[tuple[int, int, int, int]]] = {
    256: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
    128: [
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (256, 64, 16, 2),
        (256, 64, 16, 3),
        (256, 32, 8, 3),
        (64, 64, 4, 3),
    ],
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (256, 64, 8, 3), (256, 128, 16, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 4, 3), (256, 64, 8, 3), (64, 64, 4, 3)],
}
_PACK_CONFIGS_BY_HEAD_DIM[16] = _PACK_CONFIGS_BY_HEAD_DIM[32]
_PACK_MAX = 4


def _variant_configs(variant: str, head_dim: int) -> list[tuple[int, int, int, int]]:
    if variant == "gqa_pack":
        return list(_PACK_CONFIGS_BY_HEAD_DIM[head_dim])
    if variant == "wide":
        base = list(_CONFIGS_BY_HEAD_DIM[head_dim])
        return base + [c for c in _WIDE_EXTRA[head_dim] if c not in base]
    return list(_CONFIGS_BY_HEAD_DIM[head_dim])


def _resolve_variant(variant: str | None) -> str:
    """`variant` argument, else SLIPSTREAM_FLASH_VARIANT (read on every call), else default."""
    name = variant if variant is not None else os.environ.get("SLIPSTREAM_FLASH_VARIANT", "")
    name = name.strip() or _DEFAULT_VARIANT
    if name not in VARIANTS:
        raise ValueError(
            f"flash_attn_varlen: unknown variant {name!r} (SLIPSTREAM_FLASH_VARIANT); "
            f"expected one of {VARIANTS}"
        )
    return name


def _fallback_variant(num_seqs: int, causal: bool) -> str:
    """The Triton kernel that runs a call `sm90_ws` cannot take: gqa_pack, except base for
    one causal sequence (tied, then 4% ahead there on the H100 A/B runs:
    benchmarks/results/attention_variants_h100.json, attention_bench_h100.json)."""
    return "base" if causal and num_seqs == 1 else "gqa_pack"


def _pack_for(group_size: int, block_m: int) -> int:
    """Heads stacked per program for `gqa_pack`: the largest power of two <= _PACK_MAX that
    divides the GQA group and leaves at least one position per block."""
    pack = _PACK_MAX
    while pack > 1 and (group_size % pack or block_m % pack):
        pack //= 2
    return pack


# Under the interpreter (CPU tests) there is nothing to tune: one small fixed config that
# still exercises multi-block loops and the diagonal split on tiny sequences.
_INTERPRETER_BLOCKS = (16, 16)


@functools.cache
def _build_kernels() -> Any:
    """jit-wrap the kernel functions on first use (returns the main JITFunction)."""
    if triton is None:
        raise RuntimeError(
            "slipstream.kernels.flash_attn_varlen needs Triton, which failed to import: "
            f"{_TRITON_IMPORT_ERROR!r}"
        )
    g = globals()
    # The main kernel resolves `_attn_fwd_inner` through this module's globals at compile
    # time, so the jitted helper must be installed under that name before the first launch.
    # (Under TRITON_INTERPRET=1 triton.jit returns an InterpretedFunction instead.)
    for helper in ("_attn_fwd_inner", "_load_q_norm_rope"):
        if isinstance(g[helper], types.FunctionType):
            g[helper] = triton.jit(g[helper])
    if isinstance(g["_flash_attn_varlen_fwd_kernel"], types.FunctionType):
        # No value specialisation (==1, %16) for these scalars: it would compile every config
        # again for batch == 1 vs > 1, 16 heads vs 12, ... for no measurable gain.
        g["_flash_attn_varlen_fwd_kernel"] = triton.jit(
            g["_flash_attn_varlen_fwd_kernel"],
            do_not_specialize=[
                "batch",
                "num_heads_q",
                "group_size",
                "SEQ_BUCKET_Q",
                "SEQ_BUCKET_K",
            ],
        )
    if isinstance(g["_flash_attn_varlen_fwd_packed_kernel"], types.FunctionType):
        g["_flash_attn_varlen_fwd_packed_kernel"] = triton.jit(
            g["_flash_attn_varlen_fwd_packed_kernel"],
            do_not_specialize=[
                "batch",
                "num_heads_q",
                "group_size",
                "SEQ_BUCKET_Q",
                "SEQ_BUCKET_K",
            ],
        )
    return g["_flash_attn_varlen_fwd_kernel"]


def _kernel_for(variant: str) -> Any:
    _build_kernels()
    if variant == "gqa_pack":
        return globals()["_flash_attn_varlen_fwd_packed_kernel"]
    return globals()["_flash_attn_varlen_fwd_kernel"]


def _autotune_bench(kernel_call: Any, quantiles: Any = None) -> Any:
    # Shorter than Triton's default (25 ms warmup, 100 ms rep) so first-call tuning stays
    # within a few seconds per key; the medians are stable at these kernel sizes.
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


def _prune_by_seqlen(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop tiles much larger than the longest sequence (bucketed), keeping at least one."""
    bucket_q = int(kwargs.get("SEQ_BUCKET_Q", named_args.get("SEQ_BUCKET_Q", 1 << 30)))
    bucket_k = int(kwargs.get("SEQ_BUCKET_K", named_args.get("SEQ_BUCKET_K", 1 << 30)))
    pack = int(kwargs.get("PACK", 1))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] // pack <= bucket_q and c.kwargs["BLOCK_N"] <= bucket_k
    ]
    if kept:
        return kept
    smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]


@functools.cache
def _autotuned_kernel(head_dim: int, variant: str = "base") -> Any:
    kernel = _kernel_for(variant)
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in _variant_configs(variant, head_dim)
    ]
    key = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET_Q", "SEQ_BUCKET_K", "Q_ROPE"]
    if variant == "gqa_pack":
        key.append("PACK")
    # The base variant keeps exactly its historical tuning (no pruning).
    prune = None if variant == "base" else {"early_config_prune": _prune_by_seqlen}
    # No reset_to_zero/restore_value: every run fully overwrites `out` and reads nothing else
    # it writes, so benchmarking a config leaves the final result correct.
    # cache_results: tuning results persist in Triton's on-disk cache across processes.
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by=prune,
        do_bench=_autotune_bench,
        cache_results=True,
    )(kernel)


def _env_config(head_dim: int, variant: str = "base") -> tuple[int, int, int, int] | None:
    """Fixed config from the environment, or None to autotune.

    SLIPSTREAM_FLASH_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages" forces one config;
    SLIPSTREAM_FLASH_AUTOTUNE=0 uses the first (expected best) config of the head_dim's list.
    """
    forced = os.environ.get("SLIPSTREAM_FLASH_CONFIG")
    if forced:
        try:
            bm, bn, w, st = (int(x) for x in forced.split(","))
        except ValueError:
            raise ValueError(
                f"SLIPSTREAM_FLASH_CONFIG must be 'BLOCK_M,BLOCK_N,num_warps,num_stages', "
                f"got {forced!r}"
            ) from None
        return (bm, bn, w, st)
    if os.environ.get("SLIPSTREAM_FLASH_AUTOTUNE", "1") == "0":
        return _variant_configs(variant, head_dim)[0]
    return None


def seq_bucket(n: int) -> int:
    # Power-of-two buckets in [64, 16384]: few autotune keys, all divisible by 16 (one
    # Triton specialisation for the unused key argument).
    return min(max(64, 1 << max(0, int(n) - 1).bit_length()), 16384)


# ----------------------------------------------------------------------------------------
# Argument checking
# ----------------------------------------------------------------------------------------


_HEAD_DIM_SET = frozenset(SUPPORTED_HEAD_DIMS)
_GPU_DTYPE_SET = frozenset(_GPU_DTYPES)
_INTERPRETER_DTYPE_SET = frozenset(_INTERPRETER_DTYPES)


def _fast_checks_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Any,
    max_seqlen_k: Any,
    softmax_scale: float | None,
) -> bool:
    """Happy path of `_check_static` in a few microseconds (this runs on every launch).

    True means every static check passes; False means "run `_check_static`", which finds the
    problem and raises a descriptive error.
    """
    try:
        qs, ks, os_ = q.shape, k.shape, out.shape
        if len(qs) != 3 or len(ks) != 3 or os_ != qs or v.shape != ks:
            return False
        d, hkv = qs[2], ks[1]
        if ks[2] != d or d not in _HEAD_DIM_SET or hkv == 0 or qs[1] % hkv:
            return False
        dt = q.dtype
        if k.dtype is not dt or v.dtype is not dt or out.dtype is not dt:
            return False
        dev = q.device
        allowed = _GPU_DTYPE_SET if dev.type == "cuda" else _INTERPRETER_DTYPE_SET
        if dt not in allowed or dev.type not in ("cuda", "cpu"):
            return False
        if k.device != dev or v.device != dev or out.device != dev:
            return False
        if cu_seqlens_q.device != dev or cu_seqlens_k.device != dev:
            return False
        if cu_seqlens_q.dtype is not torch.int32 or cu_seqlens_k.dtype is not torch.int32:
            return False
        cs = cu_seqlens_q.shape
        if len(cs) != 1 or cs[0] < 1 or cu_seqlens_k.shape != cs:
            return False
        if cs[0] > 1 and (cu_seqlens_q.stride(0) != 1 or cu_seqlens_k.stride(0) != 1):
            return False
        if d > 1 and (q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1):
            return False
        if d > 1 and out.stride(2) != 1:
            return False
        if type(max_seqlen_q) is not int or type(max_seqlen_k) is not int:
            return False
        if max_seqlen_q < 0 or max_seqlen_k < 0:
            return False
        if softmax_scale is not None and not (0.0 < float(softmax_scale) < math.inf):
            return False
        return True
    except Exception:  # anything odd: let the detailed checks explain it
        return False


def _check_static(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Any,
    max_seqlen_k: Any,
    softmax_scale: float | None,
) -> None:
    """Checks that need only metadata (no data reads): safe on fake tensors, no GPU sync."""
    named = {"q": q, "k": k, "v": v, "out": out, "cu_seqlens_q": cu_seqlens_q}
    named["cu_seqlens_k"] = cu_seqlens_k
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn_varlen: `{name}` must be a torch.Tensor, got {type(t)}")
    for name in ("q", "k", "v", "out"):
        t = named[name]
        if t.dim() != 3:
            raise ValueError(
                f"flash_attn_varlen: `{name}` must be 3-D [tokens, heads, head_dim], "
                f"got shape {tuple(t.shape)}"
            )
    head_dim = q.shape[2]
    for name in ("k", "v", "out"):
        if named[name].shape[2] != head_dim:
            raise ValueError(
                f"flash_attn_varlen: head_dim of `{name}` ({named[name].shape[2]}) differs from "
                f"q's ({head_dim})"
            )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attn_varlen: unsupported head_dim {head_dim} (`q.shape[2]`); "
            f"supported: {SUPPORTED_HEAD_DIMS}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if v.shape[1] != hkv:
        raise ValueError(f"flash_attn_varlen: `k` has {hkv} heads but `v` has {v.shape[1]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"flash_attn_varlen: query heads ({hq}, `q.shape[1]`) must be a multiple of kv heads "
            f"({hkv}, `k.shape[1]`)"
        )
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attn_varlen: `k` has {k.shape[0]} tokens but `v` has {v.shape[0]}")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(
            f"flash_attn_varlen: `out` shape {tuple(out.shape)} must equal q's {tuple(q.shape)}"
        )

    device = q.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(
                f"flash_attn_varlen: all tensors must be on one device; `q` is on {device} "
                f"but `{name}` is on {t.device}"
            )
    dtype = q.dtype
    for name in ("k", "v", "out"):
        if named[name].dtype != dtype:
            raise TypeError(
                f"flash_attn_varlen: `{name}` dtype {named[name].dtype} differs from q's {dtype}"
            )
    allowed = _GPU_DTYPES if device.type == "cuda" else _INTERPRETER_DTYPES
    if device.type in ("cuda", "cpu") and dtype not in allowed:
        raise TypeError(
            f"flash_attn_varlen: dtype {dtype} of `q` not supported on {device.type}; "
            f"supported: {[str(d) for d in allowed]}"
        )
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        t = named[name]
        if t.dtype != torch.int32:
            raise TypeError(f"flash_attn_varlen: `{name}` must be int32, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(
                f"flash_attn_varlen: `{name}` must be 1-D [batch+1], got shape {tuple(t.shape)}"
            )
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"flash_attn_varlen: `cu_seqlens_q` ({cu_seqlens_q.shape[0]}) and `cu_seqlens_k` "
            f"({cu_seqlens_k.shape[0]}) must have the same length (batch + 1)"
        )
    for name in ("q", "k", "v", "out"):
        t = named[name]
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise ValueError(
                f"flash_attn_varlen: last dim of `{name}` must have stride 1, got strides "
                f"{tuple(t.stride())}"
            )
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        if named[name].shape[0] > 1 and named[name].stride(0) != 1:
            raise ValueError(f"flash_attn_varlen: `{name}` must be contiguous")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, torch.SymInt)):
            raise TypeError(f"flash_attn_varlen: `{name}` must be an int, got {type(val)}")
        if isinstance(val, int) and val < 0:
            raise ValueError(f"flash_attn_varlen: `{name}` must be >= 0, got {val}")
    if softmax_scale is not None:
        s = float(softmax_scale)
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(
                f"flash_attn_varlen: `softmax_scale` must be finite and > 0, got {softmax_scale}"
            )


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) byte addresses touched by a strided tensor (strides are non-negative)."""
    shape, stride = t.shape, t.stride()
    if 0 in shape:
        return (0, 0)
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    start = t.data_ptr()
    return (start, start + extent * t.element_size())


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Cheap, conservative check whether two [T, H, D] views share any byte.

    First the address spans; if they intersect, we accept only the common "column slices of
    one row-major buffer" case: same row stride R, and each view's per-row footprint lies in a
    disjoint interval of [0, R) modulo R (e.g. `out` and `qkv` as column ranges of one buffer).
    """
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    if a0 == a1 or b0 == b1 or a1 <= b0 or b1 <= a0:
        return False
    row_a = a.stride(0) * a.element_size()
    row_b = b.stride(0) * b.element_size()
    if row_a != row_b or row_a == 0:
        return True
    foot_a = (
        1 + (a.shape[1] - 1) * a.stride(1) + (a.shape[2] - 1) * a.stride(2)
    ) * a.element_size()
    foot_b = (
        1 + (b.shape[1] - 1) * b.stride(1) + (b.shape[2] - 1) * b.stride(2)
    ) * b.element_size()
    if foot_a > row_a or foot_b > row_b:
        return True
    shift = (b0 - a0) % row_a  # b's row start, relative to a's, on the circle [0, R)
    return not (shift >= foot_a and shift + foot_b <= row_a)


_torch_overlaps = getattr(torch._C, "_overlaps", None)  # private; optional fast path


def _check_runtime(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """Checks on real tensors that need data pointers but no data reads (no sync)."""
    # Fast path (~0.4 us per pair): at::get_overlap_status says "no overlap" (different storage
    # or disjoint ranges); anything else goes to the finer, slower check below.
    if _torch_overlaps is not None:
        try:
            if not (_torch_overlaps(out, q) or _torch_overlaps(out, k) or _torch_overlaps(out, v)):
                return
        except Exception:
            pass
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _may_overlap(out, t):
            raise ValueError(
                f"flash_attn_varlen: `out` overlaps the memory of `{name}`; the kernel writes "
                f"`out` while other programs still read `{name}`"
            )


def _check_q_norm_rope(
    q: torch.Tensor,
    out: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_norm_eps: float,
) -> bool:
    """Validate the optional q RMSNorm + rotary prologue; True when it is requested."""
    given = [t is not None for t in (q_norm_weight, cos, sin)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError(
            "flash_attn_varlen: `q_norm_weight`, `cos` and `sin` go together (the q RMSNorm + "
            "rotary prologue needs all three)"
        )
    assert q_norm_weight is not None and cos is not None and sin is not None
    t, d = q.shape[0], q.shape[2]
    if not isinstance(q_norm_weight, torch.Tensor):
        raise TypeError("flash_attn_varlen: `q_norm_weight` must be a torch.Tensor")
    if q_norm_weight.dim() != 1 or q_norm_weight.shape[0] != d:
        raise ValueError(
            f"flash_attn_varlen: `q_norm_weight` must have shape ({d},) [head_dim], got "
            f"{tuple(q_norm_weight.shape)}"
        )
    for name, x in (("q_norm_weight", q_norm_weight), ("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"flash_attn_varlen: `{name}` must be a floating-point tensor")
        if x.device != q.device:
            raise ValueError(f"flash_attn_varlen: `{name}` is on {x.device} but `q` on {q.device}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"flash_attn_varlen: last dim of `{name}` must have stride 1")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.dim() != 2 or tuple(x.shape) != (t, d // 2):
            raise ValueError(
                f"flash_attn_varlen: `{name}` must have shape ({t}, {d // 2}) [query tokens, "
                f"head_dim / 2] (the first half of a NeoX rotary table), got {tuple(x.shape)}"
            )
    eps = float(q_norm_eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(
            f"flash_attn_varlen: `q_norm_eps` must be finite and > 0, got {q_norm_eps}"
        )
    return True


def _check_q_rope_overlap(out: torch.Tensor, *inputs: tuple[str, torch.Tensor]) -> None:
    """Real tensors only: `out` must not share bytes with what the q prologue reads."""
    for name, x in inputs:
        same = x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        if same and out.numel() and x.numel():
            (a0, a1), (b0, b1) = _byte_span(out), _byte_span(x)
            if a0 < b1 and b0 < a1:
                raise ValueError(
                    f"flash_attn_varlen: `out` overlaps the memory of `{name}`, which the "
                    f"kernel reads"
                )


def _check_cu_seqlens_values(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """Data-dependent checks: they read cu_seqlens (a device->host sync on CUDA)."""
    for name, cu, total, max_len, tname in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "q"),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "k"),
    ):
        vals = cu.detach().to("cpu", torch.int64)
        if int(vals[0]) != 0:
            raise ValueError(f"flash_attn_varlen: `{name}[0]` must be 0, got {int(vals[0])}")
        lens = vals[1:] - vals[:-1]
        if lens.numel() and int(lens.min()) < 0:
            raise ValueError(f"flash_attn_varlen: `{name}` must be non-decreasing")
        last = int(vals[-1])
        if tname == "q" and last != total:
            raise ValueError(
                f"flash_attn_varlen: `cu_seqlens_q[-1]` ({last}) must equal the number of query "
                f"tokens `q.shape[0]` ({total})"
            )
        if tname == "k" and last > total:
            raise ValueError(
                f"flash_attn_varlen: `cu_seqlens_k[-1]` ({last}) exceeds the number of key tokens "
                f"`k.shape[0]` ({total})"
            )
        if lens.numel() and int(lens.max()) > int(max_len):
            raise ValueError(
                f"flash_attn_varlen: longest sequence in `{name}` ({int(lens.max())}) exceeds "
                f"`max_seqlen_{tname}` ({int(max_len)})"
            )


# ----------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float | None,
    q_norm_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_eps: float = 1e-6,
    *,
    config: tuple[int, ...] | None = None,
    variant: str | None = None,
) -> None:
    """Check, then launch the kernel writing into `out`.

    With `q_norm_weight`, `cos` and `sin`, q is read raw (straight from the qkv projection) and
    the kernel applies the per-head q RMSNorm and NeoX rotary to each Q tile as it loads it.

    `config` = (BLOCK_M, BLOCK_N[, num_warps, num_stages]) bypasses autotuning (tests, and the
    interpreter, which always uses a small fixed config). `variant` (one of VARIANTS) overrides
    SLIPSTREAM_FLASH_VARIANT.
    """
    if variant is None:  # read the environment once per call
        variant = os.environ.get("SLIPSTREAM_FLASH_VARIANT", "")
    by_default = not variant.strip()
    variant = _resolve_variant(variant)
    if not _fast_checks_pass(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
    ):
        _check_static(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"flash_attn_varlen: unsupported device {q.device}")
    _check_runtime(q, k, v, out)
    q_rope = _check_q_norm_rope(q, out, q_norm_weight, cos, sin, q_norm_eps)
    if q_rope:
        _check_q_rope_overlap(out, ("q_norm_weight", q_norm_weight), ("cos", cos), ("sin", sin))
    if q.device.type == "cpu" or _debug_mode():
        _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.device.type == "cpu" and not _interpret_mode():
        raise RuntimeError(
            "flash_attn_varlen: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 "
            "set before the first call)"
        )

    batch = cu_seqlens_q.shape[0] - 1
    hq, hkv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if batch == 0 or q.shape[0] == 0 or hq == 0 or int(max_seqlen_q) == 0:
        return  # nothing to write
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)

    args = (
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        batch, hq, hq // hkv,
        *(
            (q_norm_weight, cos, sin, cos.stride(0), sin.stride(0), float(q_norm_eps))
            if q_rope else (q, q, q, 0, 0, 0.0)  # placeholders the kernel never reads
        ),
        seq_bucket(max_seqlen_q), seq_bucket(max_seqlen_k),
    )  # fmt: skip
    meta = {"HEAD_DIM": head_dim, "CAUSAL": bool(causal), "Q_ROPE": q_rope}
    if os.environ.get("SLIPSTREAM_FLASH_WS", "0") == "1" and not _interpret_mode():
        meta["WS"] = True

    if variant == "sm90_ws":
        rope = (q_norm_weight, cos, sin, q_norm_eps) if q_rope else ()
        if _sm90_first(by_default, config, max_seqlen_q) and _try_sm90(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, causal, scale * _LOG2E, *rope,
            by_default=by_default,
        ):  # fmt: skip
            return
        variant = _fallback_variant(cu_seqlens_q.shape[0] - 1, causal)
    if config is None:
        config = _INTERPRETER_BLOCKS if _interpret_mode() else _env_config(head_dim, variant)
    run = (args, meta, hq, hq // hkv, batch, q.shape[0], head_dim, config, variant)
    with device_ctx(q.device):
        _run_kernel(*run)


# As the default, the Gluon kernel runs only for batches whose longest query sequence is over
# this many tokens. Its per-tile start (one 192 KiB program per SM, a Q prologue with no
# overlap) is paid on every 64-row tile, so short sequences run faster on the Triton kernel.
# H100, Qwen3-0.6B layout, ~16K-token packed causal batches, lengths log-uniform in
# [cap / 8, cap] (scripts/attn_crossover.py, attention_crossover_h100.json): sm90_ws / gqa_pack
# = 0.38x at cap 16, 0.47x at 64, 0.65x at 256, 0.92x at 512, 0.84x at 1024, 1.01x at 2048,
# 1.16x at 4096. A power of two, so that the choice is the same for every batch of a CUDA
# graph key (embed_graph keys on seq_bucket(max_seqlen)).
_SM90_MIN_MAX_SEQLEN = 1024


def sm90_pays_off(max_seqlen_q: int) -> bool:
    """Whether the default dispatch sends a batch with this longest sequence to `sm90_ws`."""
    return seq_bucket(int(max_seqlen_q)) > _SM90_MIN_MAX_SEQLEN


def _sm90_first(by_default: bool, config: tuple[int, ...] | None, max_seqlen_q: int) -> bool:
    """Whether a call resolved to `sm90_ws` tries the Gluon kernel (`_try_sm90` may still
    decline) before its Triton fallback: never with an explicit `config` or under the
    interpreter; as the default only where it pays off; always when asked for by name."""
    if config is not None or _interpret_mode():
        return False
    return not by_default or sm90_pays_off(max_seqlen_q)


# Why the Gluon kernel is off for this process (it failed to build or load once), or None.
_SM90_DISABLED: str | None = None
# Triton releases the Gluon kernel was measured with on the H100 (docs/performance.md); under
# others it runs only when asked for (SLIPSTREAM_FLASH_VARIANT=sm90_ws).
_SM90_MEASURED_TRITON = ("3.6.",)


def _try_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    qk_scale: float,
    *rope: Any,
    by_default: bool = False,
) -> bool:
    """Run the call on the Gluon sm90 kernel if it can take it; False leaves it to Triton.

    As the default (`by_default`, no variant asked for) it runs only under the Triton releases
    it was measured with (`_SM90_MEASURED_TRITON`): Gluon is experimental and its code
    generation moves between releases (under Triton 3.9 the same source compiles with register
    spills and a shorter softmax/multiply overlap). A kernel that fails to compile or load (a
    Gluon API change, a GPU with less shared memory) disables the Gluon path for the process
    with one warning; every call then runs the Triton kernel instead of failing.
    """
    global _SM90_DISABLED
    if _SM90_DISABLED is not None:
        return False
    if by_default and not triton.__version__.startswith(_SM90_MEASURED_TRITON):
        return False
    from slipstream.kernels import flash_attn_sm90 as sm90

    if sm90.supported(q, k, v, out, cu_seqlens_q, cu_seqlens_k) is not None:
        return False
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    try:
        with device_ctx(q.device):
            sm90.launch(q, k, v, out, cu_seqlens_q, causal, qk_scale, *rope)
    except (CompilationError, OutOfResources) as exc:
        _SM90_DISABLED = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _log.warning(
            "flash_attn_varlen: the Gluon sm90 kernel is unavailable (%s); using the Triton "
            "kernel for the rest of this process",
            _SM90_DISABLED,
        )
        return False
    return True


def _run_kernel(
    args: tuple[Any, ...],
    meta: dict[str, Any],
    hq: int,
    group_size: int,
    batch: int,
    total_q: int,
    head_dim: int,
    config: tuple[int, ...] | None,
    variant: str = "base",
) -> None:
    # Grid size: (programs per block row) * (T_q // positions_per_block + B) virtual query
    # blocks (see the kernels). Base/wide: one head per program; gqa_pack: PACK heads.
    if variant == "gqa_pack":
        meta = dict(meta)
        if config is not None:
            pack = _pack_for(group_size, int(config[0]))
        else:  # every autotune candidate has BLOCK_M >= 64, a multiple of _PACK_MAX
            pack = _pack_for(group_size, 64)
        meta["PACK"] = pack
    else:
        pack = 1
    programs = hq // pack
    if config is not None:
        block_m, block_n, num_warps, num_stages = (tuple(config) + (4, 2))[:4]
        grid = (programs * (total_q // (block_m // pack) + batch),)
        _kernel_for(variant)[grid](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
        return

    def grid_fn(meta_: dict[str, Any]) -> tuple[int]:
        return (programs * (total_q // (meta_["BLOCK_M"] // pack) + batch),)

    _autotuned_kernel(head_dim, variant)[grid_fn](*args, **meta)


# ----------------------------------------------------------------------------------------
# torch.library registration: `torch.ops.slipstream.flash_attn_varlen`
# ----------------------------------------------------------------------------------------


def _op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_norm_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_eps: float = 1e-6,
) -> None:
    _launch(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        softmax_scale, q_norm_weight, cos, sin, q_norm_eps,
    )  # fmt: skip


def _op_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_norm_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_eps: float = 1e-6,
) -> None:
    # Metadata checks only; allocates nothing and returns nothing: `out` is mutated in place.
    _check_static(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
    )
    _check_q_norm_rope(q, out, q_norm_weight, cos, sin, q_norm_eps)


def _op_registered() -> bool:
    try:
        torch.ops.slipstream.flash_attn_varlen.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_op() -> torch.library.Library | None:
    if _op_registered():
        return None  # already registered (module re-imported under another name)
    lib = torch.library.Library("slipstream", "FRAGMENT")
    lib.define(_OP_SCHEMA)
    # CPU is served by the Triton interpreter (tests); CUDA by the compiled kernel.
    lib.impl("flash_attn_varlen", _op_impl, "CPU")
    lib.impl("flash_attn_varlen", _op_impl, "CUDA")
    # A raw `define`d op gets no version-counter bump for its mutated argument (custom_op adds
    # one, at a higher per-call cost); do the same here so autograd/compile see `out` change.
    lib.impl("flash_attn_varlen", _op_adinplaceorview, "ADInplaceOrView", with_keyset=True)
    torch.library.register_fake(_OP_QUALNAME, _op_fake, lib=lib)
    return lib


def _op_adinplaceorview(keyset: Any, *args: Any, **kwargs: Any) -> None:
    out = args[3] if len(args) > 3 else kwargs["out"]
    torch.autograd.graph.increment_version(out)
    torch.ops.slipstream.flash_attn_varlen.default.redispatch(
        keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs
    )


# The Library object must stay alive or its registrations are dropped. On importlib.reload the
# module dict (and thus the existing _LIB) survives, so registration happens exactly once.
_LIB: torch.library.Library | None = globals().get("_LIB")
if _LIB is None:
    _LIB = _register_op()


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    q_norm_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_eps: float = 1e-6,
    check: bool | None = None,
) -> None:
    """Packed variable-length attention, written in place into ``out``.

    Args:
        q: ``[T_q, Hq, D]`` queries (fp16/bf16 on CUDA; fp32 too under the interpreter).
        k, v: ``[T_k, Hkv, D]`` keys/values; ``Hq % Hkv == 0`` (GQA).
        out: ``[T_q, Hq, D]`` destination, may be a strided view into a larger buffer.
        cu_seqlens_q, cu_seqlens_k: ``[B+1]`` int32 cumulative sequence lengths.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (host ints).
        causal: bottom-right aligned causal mask (see module docstring).
        softmax_scale: defaults to ``1/sqrt(D)``.
        q_norm_weight, cos, sin, q_norm_eps: the q prologue (all three tensors or none).
            ``q`` is then the raw projection output and each Q tile gets Qwen3's per-head
            RMSNorm (``q_norm_weight`` [D], ``q_norm_eps``) and NeoX rotary (``cos``/``sin``
            [T_q, D/2]: the first half of each row of a NeoX table, whose two halves are equal;
            RotaryEmbedding.cos_sin_half gives them in q's dtype) as it is loaded, with the same
            rounding as ``fused.qk_norm_rope_``; ``q`` itself is not written.
        check: also validate the *values* of cu_seqlens (a GPU sync). Default: on for CPU
            tensors (always checked there) or when ``SLIPSTREAM_DEBUG=1``.
    """
    if check and q.device.type != "cpu":  # the op itself checks CPU / SLIPSTREAM_DEBUG
        _check_static(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
        )
        _check_cu_seqlens_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, torch.SymInt)):
            raise TypeError(f"flash_attn_varlen: `{name}` must be an int, got {type(val)}")
    rope = (q_norm_weight, cos, sin)
    if eager_direct_ok(q, k, v, out, cu_seqlens_q, cu_seqlens_k) and all(
        t is None or eager_direct_ok(t) for t in rope
    ):
        # Plain eager call: launch directly. Going through the dispatcher to a Python kernel
        # costs ~10 us of boxing per call for nothing; the effect is identical (same launch,
        # same version-counter bump the ADInplaceOrView kernel does).
        _launch(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
            None if softmax_scale is None else float(softmax_scale), *rope, float(q_norm_eps),
        )  # fmt: skip
        if not torch.is_inference_mode_enabled():
            torch.autograd.graph.increment_version(out)
        return
    # Tracing (torch.compile, make_fx, export), tensor subclasses or active modes: the op, so
    # the call is recorded as a mutation of `out`.
    torch.ops.slipstream.flash_attn_varlen(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
        None if softmax_scale is None else float(softmax_scale), *rope, float(q_norm_eps),
    )  # fmt: skip
