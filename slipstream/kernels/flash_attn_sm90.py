"""Hopper (sm_90) varlen flash attention written in Gluon: producer/consumer warp specialisation.

Why a second kernel. The Triton kernel in `flash_attn.py` leaves the scheduling of its key
loop to the compiler, and on Hopper that loop waits on every warpgroup MMA as soon as it is
issued: the softmax of one key block never overlaps a matrix multiply. This kernel spells the
schedule out with Gluon (Triton's lower-level dialect: explicit layouts, shared memory,
mbarriers, TMA and asynchronous `wgmma`):

* one **producer** warp streams K and V blocks into two rings of shared-memory stages with
  TMA, gated by `ready` / `free` mbarriers;
* two **consumer** warpgroups each own 64 query rows of a tile: the two query heads that read
  the same kv head, at the same 64 positions, so both walk the same key blocks and every K/V
  block in shared memory feeds 128 query rows;
* inside a consumer, block j's QK^T is issued before block j-1's P @ V, and block j's softmax
  runs while that P @ V is still on the tensor cores (a wgmma wait with one group left
  outstanding; see `_key_block` for what keeps ptxas from undoing it). The two consumers are
  independent partitions, so the hardware also interleaves one's softmax with the other's
  multiplies.

Same contract as `flash_attn_varlen` (packed `[T, H, D]` q/k/v, `cu_seqlens`, bottom-right
causal alignment, optional q RMSNorm + NeoX rotary on the Q load, writes `out` in place and
nothing else), for the calls the embedding path makes: self-attention (`cu_seqlens_q` is
`cu_seqlens_k`), head_dim 128, an even GQA group, bf16/fp16, K/V heads contiguous in each token
row. `supported()` says whether a call qualifies; `flash_attn.py` routes every qualifying call
here (variant `sm90_ws`, the default) and the rest to its Triton kernel.

Gluon kernels do not run under the Triton interpreter; the tests for this file are GPU tests
(tests/test_flash_sm90.py) against the torch reference. Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
import os

import torch

HEAD_DIM = 128
BLOCK_M = 64  # query rows per consumer warpgroup
BLOCK_N = 128  # keys per K/V tile
# Ring depths: V is freed one block later than K (see _key_block), so it wants one stage more.
# 2 x 32 KiB of K + 3 x 32 KiB of V + 2 x 16 KiB of Q = 192 KiB of shared memory.
K_STAGES = 2
V_STAGES = 3
PACK = 2  # query heads per program (one per consumer), sharing one kv head
CONSUMER_REGS = 232  # registers per consumer thread (setmaxnreg); the producer warp gets 24
# One program per tile (0) or a persistent grid of one program per SM (1). The kernel loops
# over tiles either way; on the H100 the persistent grid was no faster end to end
# (sm90_ab_mixed_h100_run2.json) and -5%..+2% per case on the attention benchmarks
# (attention_sm90_sweep{4,5}_h100.json), so it is an A/B option (SLIPSTREAM_SM90_CONFIG), off.
PERSISTENT = 0


def gluon_available() -> bool:
    return gluon is not None


def supported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> str | None:
    """None when this kernel can run the call, else the reason it cannot (for the fallback)."""
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}"
    if q.shape[2] != HEAD_DIM or k.shape[2] != HEAD_DIM:
        return f"head_dim {q.shape[2]}"
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv or (hq // hkv) % PACK:
        return f"GQA group {hq}/{hkv} is not a multiple of {PACK}"
    if cu_seqlens_q is not cu_seqlens_k and cu_seqlens_q.data_ptr() != cu_seqlens_k.data_ptr():
        return "cross attention (cu_seqlens_q is not cu_seqlens_k)"
    for name, t in (("k", k), ("v", v)):
        # TMA reads each token's heads as one row of a 2-D [T, H*D] tensor.
        if t.stride(2) != 1 or t.stride(1) != HEAD_DIM:
            return f"{name} heads are not contiguous"
        if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} rows are not 16-byte aligned"
    if q.stride(2) != 1 or out.stride(2) != 1:
        return "q/out last dim not contiguous"
    if not gluon_available():
        return "Triton without Gluon"
    return None


try:  # Gluon ships with Triton >= 3.5; without it `supported()` says no and nothing is built.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # TMA global -> shared copy: `async_copy_global_to_shared` in Triton 3.5/3.6 (the GPU
    # machine), renamed `async_load` later (3.9 raises on the old name).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
except Exception:  # pragma: no cover - depends on the Triton version
    gluon = None  # type: ignore[assignment]
    gl = None  # type: ignore[assignment]


if gluon is not None:

    @gluon.jit
    def _tile(t, cu_seqlens, batch, num_groups, num_virtual, BLOCK_M: gl.constexpr):
        # Tile t -> (head group, sequence start, length, first row m0). Tiles run in the
        # order t = 0, 1, ...: virtual query blocks from the last down (the heaviest blocks
        # of each causal sequence first), all head groups of one block side by side. Virtual
        # blocks of sequence b are [cu[b] // BLOCK_M + b, cu[b+1] // BLOCK_M + b + 1): at
        # least cdiv(L_b, BLOCK_M) of them and at most one spare (m0 >= L_b: skipped).
        hgroup = t % num_groups
        vblock = num_virtual - 1 - t // num_groups
        lo = t * 0
        hi = lo + batch
        while lo < hi:
            mid = (lo + hi) // 2
            go_right = gl.load(cu_seqlens + mid) // BLOCK_M + mid <= vblock
            lo = gl.where(go_right, mid + 1, lo)
            hi = gl.where(go_right, hi, mid)
        seq = lo - 1
        start = gl.load(cu_seqlens + seq)
        seqlen = gl.load(cu_seqlens + seq + 1) - start
        m0 = (vblock - (start // BLOCK_M + seq)) * BLOCK_M
        return hgroup, start, seqlen, m0

    @gluon.jit
    def _snake(t0, nprog):
        # Round t0 // nprog's tile for this program (t0 = round * nprog + pid): rounds
        # alternate direction, so with tiles in falling order of work every program's total
        # evens out (a static schedule close to longest-first).
        r = t0 // nprog
        p = t0 - r * nprog
        return r * nprog + p + (r % 2) * (nprog - 1 - 2 * p)

    @gluon.jit
    def _round_tile(t0, nprog, num_tiles, cu_seqlens, batch, num_groups, num_virtual,
                    BLOCK_M: gl.constexpr):  # fmt: skip
        # This program's tile for slot t0 of its loop, and whether it has rows to compute. The
        # last round may run past the tiles: the bounds read are a real tile's (clamped).
        t = _snake(t0, nprog)
        hgroup, start, seqlen, m0 = _tile(gl.minimum(t, num_tiles - 1), cu_seqlens, batch,
                                          num_groups, num_virtual, BLOCK_M)  # fmt: skip
        return (t < num_tiles) & (m0 < seqlen), hgroup, start, seqlen, m0

    @gluon.jit
    def _num_key_blocks(m0, seqlen, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr):  # fmt: skip
        if CAUSAL:
            return gl.cdiv(gl.minimum(m0 + BLOCK_M, seqlen), BLOCK_N)
        else:
            return gl.cdiv(seqlen, BLOCK_N)

    @gluon.jit
    def _producer(
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_free, v_free, cu_seqlens,
        batch, num_groups, num_virtual, num_tiles, group_size,
        CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr, PACK: gl.constexpr, K_STAGES: gl.constexpr,
        V_STAGES: gl.constexpr,
    ):  # fmt: skip
        # One warp: stream every tile's K and V blocks into the two rings, each stage once
        # both consumers freed it. `g` counts blocks over all of this program's tiles, so
        # the next tile's first blocks load while the consumers finish the current one.
        g = 0
        nprog = gl.num_programs(0)
        for t0 in range(gl.program_id(0), gl.cdiv(num_tiles, nprog) * nprog, nprog):
            live, hgroup, start, seqlen, m0 = _round_tile(
                t0, nprog, num_tiles, cu_seqlens, batch, num_groups, num_virtual, BLOCK_M
            )
            if live:
                kv_col = (hgroup * PACK // group_size) * HEAD_DIM
                n_blocks = _num_key_blocks(m0, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
                for j in range(n_blocks):
                    sk = g % K_STAGES
                    sv = g % V_STAGES
                    row = start + j * BLOCK_N
                    # A fresh barrier passes a wait on phase 1 at once: the first lap runs free.
                    mbarrier.wait(k_free.index(sk), ((g // K_STAGES) & 1) ^ 1)
                    mbarrier.expect(k_ready.index(sk), k_desc.block_type.nbytes)
                    _tma_load(k_desc, [row, kv_col], k_ready.index(sk), k_smem.index(sk))
                    mbarrier.wait(v_free.index(sv), ((g // V_STAGES) & 1) ^ 1)
                    mbarrier.expect(v_ready.index(sv), v_desc.block_type.nbytes)
                    _tma_load(v_desc, [row, kv_col], v_ready.index(sv), v_smem.index(sv))
                    g += 1

    @gluon.jit
    def _softmax_step(
        s_acc, m_i, l_i, cols0, rows, n_start, seqlen_k, qk_scale,
        CAUSAL: gl.constexpr, MASKED: gl.constexpr,
    ):  # fmt: skip
        # Online softmax of one [BLOCK_M, BLOCK_N] score block (exp2 domain). MASKED blocks
        # reach past the diagonal (causal) or the sequence end. A compile-time switch: a
        # branch between a wgmma's issue and its wait makes ptxas wait at the branch.
        if MASKED:
            cols = n_start + cols0
            if CAUSAL:
                visible = gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1)
            else:
                visible = (gl.expand_dims(cols, 0) < seqlen_k) & (gl.expand_dims(rows, 1) >= 0)
            s_acc = gl.where(visible, s_acc, float("-inf"))
        # qk_scale > 0, so max(s) * scale == max(s * scale) and the scale folds into the FMA.
        m_new = gl.maximum(m_i, gl.max(s_acc, axis=1) * qk_scale)
        p = gl.exp2(s_acc * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)  # m_i starts finite (-1e30), so never NaN
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _key_block(
        j, g0, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_ready, v_ready, k_free,
        v_free, s_zero, cols0, rows, seqlen_k, qk_scale,
        CAUSAL: gl.constexpr, MASKED: gl.constexpr, P_LAYOUT: gl.constexpr,
        O_LAYOUT: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
        BLOCK_N: gl.constexpr,
    ):  # fmt: skip
        # Key block j >= 1 of the tile (ring index g0 + j), FlashAttention-3's in-warpgroup
        # overlap: issue QK^T of block j; rescale the accumulator to block j-1's running max
        # while it runs; issue P_{j-1} @ V_{j-1}; once QK^T is back, block j's softmax runs
        # while P @ V is still on the tensor cores. P_j becomes a wgmma operand only after
        # that multiply retires.
        g = g0 + j
        s = g % K_STAGES
        sp = (g - 1) % V_STAGES
        mbarrier.wait(k_ready.index(s), (g // K_STAGES) & 1)
        s_acc = warpgroup_mma(
            q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
        mbarrier.wait(v_ready.index(sp), ((g - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
        # Groups retire in order: with one left outstanding, QK^T of block j is done. Free
        # K_j, and V_{j-2}, whose P @ V retired in the previous call. (V_{j-1} is freed one
        # block later: an mbarrier arrive costs a partition barrier, and ptxas hoists a wgmma
        # wait that precedes a barrier above the softmax, which would end the overlap.)
        s_acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_acc,))
        mbarrier.arrive(k_free.index(s), count=1)
        mbarrier.arrive(v_free.index((g + V_STAGES - 2) % V_STAGES), count=1, pred=j >= 2)
        p32, m_i, l_i, alpha = _softmax_step(
            s_acc, m_i, l_i, cols0, rows, j * BLOCK_N, seqlen_k, qk_scale,
            CAUSAL=CAUSAL, MASKED=MASKED,
        )  # fmt: skip
        # p32 passes through the wait so that its conversion cannot be scheduled above it.
        acc, p, p32 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p, p32))
        p = gl.convert_layout(p32.to(p.dtype), P_LAYOUT)
        return p, acc, m_i, l_i, alpha

    @gluon.jit
    def _consumer(
        Q, Out, QW, COS, SIN, cu_seqlens, q_smem, k_smem, v_smem, k_ready, v_ready, k_free,
        v_free, batch, num_groups, num_virtual, num_tiles, which,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_cos, stride_sin, q_eps, qk_scale,
        CAUSAL: gl.constexpr, Q_ROPE: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, PACK: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
    ):  # fmt: skip
        # One warpgroup, query head `which` of each tile's head pair: 64 rows per tile.
        dtype: gl.constexpr = Q.dtype.element_ty
        HALF: gl.constexpr = HEAD_DIM // 2
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
        cols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o_r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        g0 = 0  # ring index of the tile's first key block (same count as the producer's)
        nprog = gl.num_programs(0)
        for t0 in range(gl.program_id(0), gl.cdiv(num_tiles, nprog) * nprog, nprog):
            live, hgroup, q_start, seqlen, m0 = _round_tile(
                t0, nprog, num_tiles, cu_seqlens, batch, num_groups, num_virtual, BLOCK_M
            )
            if live:
                head = hgroup * PACK + which
                n_blocks = _num_key_blocks(m0, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
                # ---- the Q tile: load, (q RMSNorm + NeoX rotary), into shared memory ----
                pos = m0 + r
                row_ok = gl.expand_dims(pos < seqlen, 1)
                tok = (q_start + pos).to(gl.int64)
                q_rows = Q + gl.expand_dims(tok * stride_qt + head * stride_qh, 1)
                x = gl.load(q_rows + gl.expand_dims(d, 0), mask=row_ok, other=0.0)
                if Q_ROPE:
                    # Same float32 math and roundings as flash_attn._load_q_norm_rope; the
                    # partner element (d + D/2) mod D is read a second time instead of
                    # splitting the tile.
                    dp = (d + HALF) % HEAD_DIM
                    xf = x.to(gl.float32)
                    xpf = gl.load(q_rows + gl.expand_dims(dp, 0), mask=row_ok, other=0.0)
                    xpf = xpf.to(gl.float32)
                    rstd = gl.rsqrt(gl.sum(xf * xf, axis=1) / HEAD_DIM + q_eps)
                    rstd = gl.expand_dims(rstd, 1)
                    w = gl.expand_dims(gl.load(QW + d).to(gl.float32), 0)
                    wp = gl.expand_dims(gl.load(QW + dp).to(gl.float32), 0)
                    n = ((xf * rstd).to(dtype).to(gl.float32) * w).to(dtype).to(gl.float32)
                    npart = ((xpf * rstd).to(dtype).to(gl.float32) * wp).to(dtype)
                    npart = npart.to(gl.float32)
                    dh = gl.expand_dims(d % HALF, 0)
                    c = gl.load(COS + gl.expand_dims(tok * stride_cos, 1) + dh, mask=row_ok,
                                other=0.0).to(dtype).to(gl.float32)  # fmt: skip
                    sn = gl.load(SIN + gl.expand_dims(tok * stride_sin, 1) + dh, mask=row_ok,
                                 other=0.0).to(dtype).to(gl.float32)  # fmt: skip
                    sign = gl.expand_dims(gl.where(d < HALF, -1.0, 1.0), 0)
                    rot = (sign * (npart * sn)).to(dtype).to(gl.float32)
                    x = ((n * c).to(dtype).to(gl.float32) + rot).to(dtype)
                # The previous tile's multiplies have all retired (wait 0 below), so the
                # buffer is free; the fence orders these writes before the wgmma reads.
                q_smem.store(x)
                fence_async_shared()

                # ---- the key loop: blocks [0, n_full) need no mask ----
                rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
                if CAUSAL:
                    n_full = (m0 + 1) // BLOCK_N
                else:
                    n_full = seqlen // BLOCK_N
                m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
                l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

                s0 = g0 % K_STAGES
                mbarrier.wait(k_ready.index(s0), (g0 // K_STAGES) & 1)
                s_acc = warpgroup_mma(
                    q_smem, k_smem.index(s0).permute((1, 0)), s_zero, use_acc=False,
                    is_async=True,
                )  # fmt: skip
                s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc,))
                mbarrier.arrive(k_free.index(s0), count=1)
                if n_full > 0:
                    p32, m_i, l_i, alpha = _softmax_step(
                        s_acc, m_i, l_i, cols0, rows, 0, seqlen, qk_scale, CAUSAL=CAUSAL,
                        MASKED=False,
                    )  # fmt: skip
                else:
                    p32, m_i, l_i, alpha = _softmax_step(
                        s_acc, m_i, l_i, cols0, rows, 0, seqlen, qk_scale, CAUSAL=CAUSAL,
                        MASKED=True,
                    )  # fmt: skip
                p = gl.convert_layout(p32.to(dtype), p_layout)
                for j in range(1, n_full):
                    p, acc, m_i, l_i, alpha = _key_block(
                        j, g0, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_ready,
                        v_ready, k_free, v_free, s_zero, cols0, rows, seqlen, qk_scale,
                        CAUSAL=CAUSAL, MASKED=False, P_LAYOUT=p_layout, O_LAYOUT=o_layout,
                        K_STAGES=K_STAGES, V_STAGES=V_STAGES, BLOCK_N=BLOCK_N,
                    )  # fmt: skip
                for j in range(gl.maximum(n_full, 1), n_blocks):
                    p, acc, m_i, l_i, alpha = _key_block(
                        j, g0, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_ready,
                        v_ready, k_free, v_free, s_zero, cols0, rows, seqlen, qk_scale,
                        CAUSAL=CAUSAL, MASKED=True, P_LAYOUT=p_layout, O_LAYOUT=o_layout,
                        K_STAGES=K_STAGES, V_STAGES=V_STAGES, BLOCK_N=BLOCK_N,
                    )  # fmt: skip
                g_last = g0 + n_blocks - 1
                sp = g_last % V_STAGES
                mbarrier.wait(v_ready.index(sp), (g_last // V_STAGES) & 1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                acc = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
                acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
                # The tile's last two V blocks were not freed in the loop.
                mbarrier.arrive(v_free.index((g_last + V_STAGES - 1) % V_STAGES), count=1,
                                pred=n_blocks >= 2)  # fmt: skip
                mbarrier.arrive(v_free.index(sp), count=1)
                g0 += n_blocks

                # ---- epilogue: normalise and store straight into `out` ----
                l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                l_o = gl.where(l_o == 0.0, 1.0, l_o)
                o = (acc / gl.expand_dims(l_o, 1)).to(dtype)
                o_pos = m0 + o_r
                o_tok = (q_start + o_pos).to(gl.int64)
                o_ptrs = Out + gl.expand_dims(o_tok * stride_ot + head * stride_oh, 1)
                o_ptrs = o_ptrs + gl.expand_dims(o_d, 0)
                gl.store(o_ptrs, o, mask=gl.expand_dims(o_pos < seqlen, 1))

    @gluon.jit
    def _flash_attn_sm90_kernel(
        Q, k_desc, v_desc, Out, cu_seqlens, qk_scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        batch, num_heads_q, group_size, num_virtual,
        QW, COS, SIN, stride_cos, stride_sin, q_eps,
        CAUSAL: gl.constexpr, Q_ROPE: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, PACK: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
    ):  # fmt: skip
        # Persistent: each program runs one tile per round (see _snake and _tile), one tile =
        # one head pair x BLOCK_M query positions of one sequence.
        num_groups = num_heads_q // PACK
        num_tiles = num_groups * num_virtual
        dtype: gl.constexpr = Q.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        q_smem0 = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
        q_smem1 = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_free = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_free.index(i), count=PACK)  # one arrive per consumer
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_free.index(i), count=PACK)

        # fmt: off
        gl.warp_specialize(
            [
                (_consumer, (
                    Q, Out, QW, COS, SIN, cu_seqlens, q_smem0, k_smem, v_smem, k_ready,
                    v_ready, k_free, v_free, batch, num_groups, num_virtual, num_tiles, 0,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cos, stride_sin, q_eps,
                    qk_scale, CAUSAL, Q_ROPE, BLOCK_M, BLOCK_N, HEAD_DIM, PACK, K_STAGES,
                    V_STAGES,
                )),
                (_consumer, (
                    Q, Out, QW, COS, SIN, cu_seqlens, q_smem1, k_smem, v_smem, k_ready,
                    v_ready, k_free, v_free, batch, num_groups, num_virtual, num_tiles, 1,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cos, stride_sin, q_eps,
                    qk_scale, CAUSAL, Q_ROPE, BLOCK_M, BLOCK_N, HEAD_DIM, PACK, K_STAGES,
                    V_STAGES,
                )),
                (_producer, (
                    k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_free, v_free,
                    cu_seqlens, batch, num_groups, num_virtual, num_tiles, group_size, CAUSAL,
                    BLOCK_M, BLOCK_N, HEAD_DIM, PACK, K_STAGES, V_STAGES,
                )),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
        # fmt: on


_CONFIG_KEYS = ("K_STAGES", "V_STAGES", "CTAS_PER_SM")


def _config() -> dict[str, int]:
    """K/V ring depths and programs per SM: the defaults, or SLIPSTREAM_SM90_CONFIG="KS,VS,P"
    (A/B runs; P = 1: a persistent grid of one program per SM, 0: one program per tile)."""
    raw = os.environ.get("SLIPSTREAM_SM90_CONFIG", "").strip()
    if not raw:
        return {"K_STAGES": K_STAGES, "V_STAGES": V_STAGES, "CTAS_PER_SM": PERSISTENT}
    try:
        ks, vs, per_sm = (int(x) for x in raw.split(","))
    except ValueError:
        ks = vs = per_sm = -1
    if not (2 <= ks <= 4 and 2 <= vs <= 4 and per_sm in (0, 1)):
        raise ValueError(f"SLIPSTREAM_SM90_CONFIG must be 'K_STAGES,V_STAGES,P', got {raw!r}")
    return {"K_STAGES": ks, "V_STAGES": vs, "CTAS_PER_SM": per_sm}


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    qk_scale: float,
    q_norm_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_eps: float = 1e-6,
) -> None:
    """Run the kernel (the caller checked `supported()` and the common arguments)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kernel = _flash_attn_sm90_kernel
    total, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    batch = cu_seqlens.shape[0] - 1
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gdt)
    descs = [
        TensorDescriptor(t, [total, hkv * HEAD_DIM], [t.stride(0), 1], [BLOCK_N, HEAD_DIM], layout)
        for t in (k, v)
    ]
    q_rope = q_norm_weight is not None
    cfg = _config()
    num_virtual = total // BLOCK_M + batch
    tiles = (hq // PACK) * num_virtual
    grid = (min(tiles, _num_sms(q.device.index)) if cfg["CTAS_PER_SM"] else tiles,)
    # fmt: off
    kernel[grid](
        q, descs[0], descs[1], out, cu_seqlens, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        batch, hq, hq // hkv, num_virtual,
        *((q_norm_weight, cos, sin, cos.stride(0), sin.stride(0), float(q_norm_eps))
          if q_rope else (q, q, q, 0, 0, 0.0)),
        CAUSAL=bool(causal), Q_ROPE=q_rope, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
        K_STAGES=cfg["K_STAGES"], V_STAGES=cfg["V_STAGES"], PACK=PACK,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )
    # fmt: on
