"""Fused elementwise / row-wise Triton kernels: RMSNorm (+ residual add), q/k RMSNorm + rotary,
SiLU-and-multiply, and per-token fp8 activation quantisation.

Each kernel reproduces the rounding order of the torch path it replaces (see ``slipstream.layers``):
math in float32, with a cast to the model dtype wherever the torch code produces a tensor in that
dtype, so bf16 results agree with the torch path to within one bf16 rounding.

Every kernel has a thin Python wrapper that checks shapes, dtypes, strides and devices before
launching and raises ``ValueError`` / ``TypeError`` naming the argument, and the launch itself is
wrapped so that a Triton compile or launch failure raises :class:`FusedKernelError` (never a
silent fallback). The kernels are registered as ``torch.ops.slipstream.*`` ops whose schemas
declare exactly which arguments they mutate (``Tensor(a!)``), like the attention kernel.

Layouts (all "rows" may have any row stride; the last dimension must have stride 1)::

    rmsnorm:             x [T, N] -> out [T, N]                    (out may be x itself)
    fused_add_rmsnorm_:  x [T, N], residual [T, N], in place:  residual <- x + residual,
                                                               x <- rmsnorm(residual) * w
    qk_norm_rope_:       qkv [T, (Hq + 2 Hkv) * D], in place on the q and k columns; v untouched
                         cos, sin [T, D] (float32 as RotaryEmbedding.cos_sin returns them)
    silu_and_mul:        x [T, 2I] -> out [T, I]
    fp8_quant_per_token: x [T, K] -> out [T, K] float8_e4m3fn, scale [T, 1] float32

Switch: ``SLIPSTREAM_FUSED`` (read when a model is constructed, see :func:`fusion_mode`):
``0``/``off`` never fuse, ``1``/``auto`` (default) fuse on CUDA for bf16/fp16, ``always`` fuse
wherever a kernel can run (CUDA, or CPU under ``TRITON_INTERPRET=1``; used by CPU tests).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from slipstream.kernels._library import device_ctx, eager_direct_ok, register_ops

try:  # Triton is optional at import time; kernels are jit-wrapped on first use.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "FP8_MAX",
    "FusedKernelError",
    "fp8_quant_per_token",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_fp8",
    "fusion_mode",
    "qk_norm_rope_",
    "rmsnorm",
    "rmsnorm_fp8",
    "should_fuse",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "triton_available",
]

logger = logging.getLogger("slipstream")

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-12  # floor of a row's absmax, so an all-zero row gets a finite scale
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# bf16 arithmetic and conversions are wrong in the Triton interpreter (3.9), so CPU runs
# (tests) are limited to fp32 and fp16, whose numpy emulation is exact.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
_MAX_ROW = 65536  # widest row the one-block-per-row kernels accept (hidden size)
_MAX_HEAD_DIM = 1024

FUSION_MODES = ("off", "auto", "always")


class FusedKernelError(RuntimeError):
    """A fused Triton kernel failed to compile or launch, or failed its first-use self-check."""


# ----------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True if Triton imports and a kernel can run (CUDA present, or TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpret_mode()


def fusion_mode() -> str:
    """The fusion mode from ``SLIPSTREAM_FUSED``: 'off', 'auto' (default) or 'always'.

    Layers read it once, at construction, so a model built with ``SLIPSTREAM_FUSED=0`` stays
    unfused (A/B benchmarks build one model of each kind in the same process).
    """
    raw = os.environ.get("SLIPSTREAM_FUSED", "auto").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("", "1", "auto", "on", "true", "yes"):
        return "auto"
    if raw in ("always", "force", "2"):
        return "always"
    raise ValueError(
        f"SLIPSTREAM_FUSED={raw!r} is not understood; use 0 (off), 1 (auto: CUDA bf16/fp16) "
        "or always"
    )


_warned_no_triton = False


def should_fuse(mode: str, x: torch.Tensor) -> bool:
    """Whether a layer in fusion ``mode`` runs the fused kernel for input ``x``."""
    global _warned_no_triton
    if mode == "off":
        return False
    if mode == "auto":
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return False
        if triton is None:
            if not _warned_no_triton:
                _warned_no_triton = True
                logger.warning(
                    "slipstream: Triton failed to import (%r); fused kernels are off and the "
                    "torch path is used",
                    _TRITON_IMPORT_ERROR,
                )
            return False
        return True
    if mode == "always":
        if triton is None:
            raise FusedKernelError(
                f"SLIPSTREAM_FUSED=always but Triton failed to import: {_TRITON_IMPORT_ERROR!r}"
            )
        return x.is_cuda or (x.device.type == "cpu" and _interpret_mode())
    raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------
# Triton kernels. Plain functions until `_kernels()` wraps them in `triton.jit` on first use,
# so importing this module never needs Triton and TRITON_INTERPRET is read at first use.
# `.to(DT).to(tl.float32)` marks a rounding the torch path performs (a tensor in the model
# dtype); in fp32 it is a no-op.
# ----------------------------------------------------------------------------------------


def _rmsnorm_kernel(
    X,  # [T, N]
    R,  # [T, N] residual (read only if HAS_RESIDUAL)
    W,  # [N]
    OUT,  # [T, N]: may be X itself (each program reads its row before writing it); or, with
    #      QUANT, [T, N] float8_e4m3fn
    RES_OUT,  # [T, N]: may be R itself
    S,  # [T] float32 per-row scales (written only with QUANT)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N,
    eps,
    min_amax,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    FP8_MAX_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # `x + residual` in the model dtype, as the torch path (and transformers) rounds it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    rstd = tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # normalise in fp32, cast to the model dtype, then multiply by the weight (rounded again).
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    y = (normed * w).to(X.dtype.element_ty)
    if QUANT:
        # The fp8 GEMM's per-token quantisation of exactly the tensor the unfused path makes.
        _quant_row_store(y.to(tl.float32), OUT + row * stride_o + cols, mask, S + row,
                         min_amax, FP8_MAX_)  # fmt: skip
    else:
        tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def _quant_row_store(y, q_ptrs, mask, s_ptr, min_amax, FP8_MAX_: tl.constexpr):
    # y: one whole row in fp32 (masked lanes 0): scale = max(rowmax|y|, min_amax) / 448,
    # q = clamp(y / scale) in float8_e4m3fn (the rounding of fp8_quant_per_token_ref).
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), min_amax) / FP8_MAX_
    tl.store(s_ptr, scale)
    q = tl.minimum(tl.maximum(y / scale, -FP8_MAX_), FP8_MAX_)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


def _silu_and_mul_kernel(
    X,  # [T, 2I]: [gate | up]
    OUT,  # [T, I]
    stride_x,
    stride_o,
    inter,  # I
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu computes x / (1 + exp(-x)) in fp32 and rounds to the dtype; then `* up` rounds.
    act = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)


def _silu_and_mul_quant_kernel(
    X,  # [T, 2I]: [gate | up]
    Q,  # [T, I] float8_e4m3fn
    S,  # [T] float32
    stride_x,
    stride_q,
    inter,  # I
    min_amax,
    FP8_MAX_: tl.constexpr,
    BLOCK: tl.constexpr,  # >= I: the whole row in one tile (its absmax sets the scale)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
    y = (act * u).to(X.dtype.element_ty).to(tl.float32)  # the unfused path's [T, I] tensor
    _quant_row_store(y, Q + row * stride_q + cols, mask, S + row, min_amax, FP8_MAX_)


def _qk_norm_rope_kernel(
    QKV,  # [T, (Hq + 2 Hkv) * D]: q heads, then k heads, then v heads (v untouched)
    QW,  # [D]
    KW,  # [D]
    COS,  # [T, D]
    SIN,  # [T, D]
    stride_t,
    stride_cos,
    stride_sin,
    num_heads_q,
    num_heads_qk,  # Hq + Hkv
    eps,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # HEAD_DIM // 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_H: tl.constexpr,  # heads per program
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    hmask = heads < num_heads_qk
    dmask = d < HALF
    mask = hmask[:, None] & dmask[None, :]
    dt = QKV.dtype.element_ty

    # Rotate-half works on the two halves of each head; load them as separate tiles.
    ptr1 = QKV + t * stride_t + heads[:, None] * HEAD_DIM + d[None, :]  # [BLOCK_H, BLOCK_HALF]
    ptr2 = ptr1 + HALF
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)

    # Per-head RMSNorm (RMSNorm.forward over the last dim of the [T, H, D] view).
    var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
    rstd = tl.rsqrt(var + eps)[:, None]
    is_q = (heads < num_heads_q)[:, None]
    w1 = tl.where(
        is_q,
        tl.load(QW + d, mask=dmask, other=0.0).to(tl.float32)[None, :],
        tl.load(KW + d, mask=dmask, other=0.0).to(tl.float32)[None, :],
    )
    w2 = tl.where(
        is_q,
        tl.load(QW + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :],
        tl.load(KW + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :],
    )
    n1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
    n2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)

    # RotaryEmbedding.rotate: cos/sin cast to the dtype first; out = x*c + rotate_half(x)*s,
    # each product and the sum rounded to the dtype, as the torch expression is.
    c1 = tl.load(COS + t * stride_cos + d, mask=dmask, other=0.0).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(COS + t * stride_cos + HALF + d, mask=dmask, other=0.0)
    c2 = c2.to(dt).to(tl.float32)[None, :]
    s1 = tl.load(SIN + t * stride_sin + d, mask=dmask, other=0.0).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(SIN + t * stride_sin + HALF + d, mask=dmask, other=0.0)
    s2 = s2.to(dt).to(tl.float32)[None, :]
    o1 = (n1 * c1).to(dt).to(tl.float32) + (-(n2 * s1)).to(dt).to(tl.float32)
    o2 = (n2 * c2).to(dt).to(tl.float32) + (n1 * s2).to(dt).to(tl.float32)
    tl.store(ptr1, o1.to(dt), mask=mask)
    tl.store(ptr2, o2.to(dt), mask=mask)


def _fp8_quant_per_token_kernel(
    X,  # [T, K]
    Q,  # [T, K] float8_e4m3fn
    S,  # [T] float32 (the [T, 1] scale tensor, contiguous)
    stride_x,
    stride_q,
    K,
    min_amax,
    FP8_MAX_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # Pass 1: the row's absmax. Pass 2 re-reads the row (from L2 for typical K).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + offs
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    scale = tl.maximum(tl.max(acc, axis=0), min_amax) / FP8_MAX_
    tl.store(S + row, scale)
    for start in range(0, K, BLOCK):
        cols = start + offs
        mask = cols < K
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX_), FP8_MAX_)
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)


_KERNEL_NAMES = (
    "_quant_row_store",  # a helper the kernels call: jit-wrapped first
    "_rmsnorm_kernel",
    "_silu_and_mul_kernel",
    "_silu_and_mul_quant_kernel",
    "_qk_norm_rope_kernel",
    "_fp8_quant_per_token_kernel",
)


@functools.cache
def _kernels() -> dict[str, Any]:
    if triton is None:
        raise FusedKernelError(
            f"slipstream fused kernels need Triton, which failed to import: "
            f"{_TRITON_IMPORT_ERROR!r}"
        )
    g = globals()
    for name in _KERNEL_NAMES:
        if not isinstance(g[name], triton.runtime.JITFunction):
            g[name] = triton.jit(g[name])
    return {name: g[name] for name in _KERNEL_NAMES}


def _launch(
    op: str, kernel: str, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any
) -> None:
    """Launch on ``device``; any compile or launch failure becomes a FusedKernelError."""
    fn = _kernels()[kernel]
    try:
        with device_ctx(device):
            fn[grid](*args, **meta)
    except Exception as e:
        raise FusedKernelError(
            f"slipstream fused kernel {op} failed to compile or launch on {device} "
            f"(triton {getattr(triton, '__version__', '?')}, torch {torch.__version__}): "
            f"{type(e).__name__}: {e}. Set SLIPSTREAM_FUSED=0 to use the torch path."
        ) from e


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------


def _check_device_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cuda":
        if t.dtype not in _GPU_DTYPES:
            raise TypeError(
                f"{op}: dtype {t.dtype} of `{name}` is not supported on CUDA; supported: "
                f"{[str(d) for d in _GPU_DTYPES]}"
            )
        if triton is None:
            raise FusedKernelError(f"{op}: Triton failed to import: {_TRITON_IMPORT_ERROR!r}")
    elif t.device.type == "cpu":
        if not _interpret_mode():
            raise RuntimeError(
                f"{op}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before "
                "triton is imported); on CPU the layers use the torch path instead"
            )
        if t.dtype not in _INTERPRETER_DTYPES:
            raise TypeError(
                f"{op}: dtype {t.dtype} of `{name}` is not supported under the Triton "
                f"interpreter; supported: {[str(d) for d in _INTERPRETER_DTYPES]}"
            )
    else:
        raise ValueError(f"{op}: unsupported device {t.device} for `{name}`")


def _check_2d_rows(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: `{name}` must be 2-D [tokens, features], got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{op}: last dim of `{name}` must have stride 1, got strides {tuple(t.stride())}"
        )
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(
            f"{op}: rows of `{name}` overlap (row stride {t.stride(0)} < width {t.shape[1]})"
        )


def _same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: `{name}` dtype {t.dtype} differs from `{ref_name}`'s {ref.dtype}"
            )


def _check_vector(
    op: str, name: str, t: torch.Tensor, n: int, ref_name: str, ref: torch.Tensor
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: `{name}` must have shape ({n},), got {tuple(t.shape)}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: `{name}` must be contiguous")
    _same(op, ref_name, ref, **{name: t})


def _check_eps(op: str, eps: float) -> float:
    e = float(eps)
    if not (e >= 0.0 and e < float("inf")):
        raise ValueError(f"{op}: `eps` must be finite and >= 0, got {eps}")
    return e


def _span(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _check_alias(
    op: str,
    out_name: str,
    out: torch.Tensor,
    in_name: str,
    inp: torch.Tensor,
    allow_identical: bool,
) -> None:
    """`out` must be exactly `inp` (in place, where allowed) or share no byte with it."""
    if allow_identical and _identical(out, inp):
        return
    a0, a1 = _span(out)
    b0, b1 = _span(inp)
    if a0 < b1 and b0 < a1:
        raise ValueError(
            f"{op}: `{out_name}` overlaps `{in_name}`"
            + (
                " without being the very same view (in-place use must pass the same tensor)"
                if allow_identical
                else ""
            )
        )


def _rows_of(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a [rows, N] view (no copy); raises if the layout cannot be viewed so."""
    if x.dim() == 2:
        return x
    if x.dim() < 1:
        raise ValueError(f"{op}: `{name}` must have at least 1 dim, got a scalar")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(
            f"{op}: `{name}` with shape {tuple(x.shape)} and strides {tuple(x.stride())} cannot "
            "be viewed as [rows, features] without a copy"
        ) from e


def _row_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


# ----------------------------------------------------------------------------------------
# First-use self-check on CUDA: each distinct kernel specialisation is compared once against
# the torch reference on a few rows of the real input (clones), so a miscompiled kernel raises
# FusedKernelError instead of producing garbage. Off with SLIPSTREAM_FUSED_CHECK=0. Skipped
# while a CUDA graph is being captured (the comparison syncs).
# ----------------------------------------------------------------------------------------

_checked: set[tuple[Any, ...]] = set()
_CHECK_ROWS = 4


def _want_check(key: tuple[Any, ...], device: torch.device) -> bool:
    if device.type != "cuda" or key in _checked:
        return False
    if os.environ.get("SLIPSTREAM_FUSED_CHECK", "1") in ("0", "off", "false"):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _compare(op: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    g, w = got.float(), want.float()
    ok = (g == w) | ((g - w).abs() <= atol + rtol * w.abs()) | (torch.isnan(g) & torch.isnan(w))
    bad = ~ok
    if bool(bad.any()):
        n = int(bad.sum())
        worst = float((g - w).abs().nan_to_num(float("inf")).max())
        raise FusedKernelError(
            f"slipstream fused kernel {op} disagrees with its torch reference on its first use "
            f"({n} of {g.numel()} values off, worst abs error {worst:.3g}; dtype {got.dtype}). "
            "This is a kernel/compiler bug: set SLIPSTREAM_FUSED=0 to use the torch path."
        )


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    # Two roundings of slack in the model dtype: only garbage fails, not ulp differences.
    return {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}.get(dtype, (1e-4, 1e-4))


def _self_check(key: tuple[Any, ...], device: torch.device, run: Callable[[], None]) -> None:
    if _want_check(key, device):
        run()
        _checked.add(key)


# ----------------------------------------------------------------------------------------
# torch references (the torch paths of slipstream.layers, restated for the self-check and tests)
# ----------------------------------------------------------------------------------------


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


def fp8_quant_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (q [T, K] float8_e4m3fn, scale [T, 1] float32), x ~= q * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=FP8_MIN_AMAX)
    scale = amax / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


# ----------------------------------------------------------------------------------------
# Launchers (the op implementations)
#
# Host cost. The argument checks are pure functions of the arguments' layout (shapes, strides,
# dtypes, devices), the scalar arguments and, for CPU tensors, TRITON_INTERPRET -- except the
# overlap checks, which also depend on the data pointers. So each implementation first looks
# the layout up in `_plans`: a hit replays what the full checks established the first time
# (the launch grid, scalar arguments and meta-parameters) and only redoes the overlap checks,
# from byte extents stored in the plan. A miss, an overlap, or a CPU plan while the interpreter
# is off runs the full checks (which raise exactly as they always have) and records the plan.
# A key never holds a layout that failed a check, so a bad argument always reaches the checks.
# ----------------------------------------------------------------------------------------


class _Plan:
    """What the checks of one op established for one argument layout."""

    __slots__ = ("args", "check_key", "cpu", "device", "eps", "ext", "grid", "meta", "same")

    def __init__(
        self,
        device: torch.device,
        grid: tuple[int, ...] | None,  # None: nothing to launch (no rows)
        args: tuple[Any, ...] = (),  # the scalar kernel arguments after the tensors
        meta: dict[str, Any] | None = None,  # constexprs and num_warps
        check_key: tuple[Any, ...] = (),  # the first-use self-check's key
        eps: float = 0.0,
        ext: tuple[int, ...] = (),  # byte extents (`_span`) of the tensors overlap-checked
        same: bool = False,  # rmsnorm: `out` and `x` have the same shape, strides and dtype
    ) -> None:
        self.device = device
        self.cpu = device.type == "cpu"  # valid only while TRITON_INTERPRET=1
        self.grid = grid
        self.args = args
        self.meta = {} if meta is None else meta
        self.check_key = check_key
        self.eps = eps
        self.ext = ext
        self.same = same


_plans: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 4096  # layouts remembered (one per op and token count, typically); then cleared


def _lookup(key: tuple[Any, ...] | None) -> _Plan | None:
    plan = _plans.get(key) if key is not None else None
    if plan is not None and plan.cpu and not _interpret_mode():
        return None  # the full checks decide (and raise)
    return plan


def _remember(key: tuple[Any, ...] | None, plan: _Plan) -> _Plan:
    if key is not None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    return plan


def _extent(t: torch.Tensor) -> int:
    lo, hi = _span(t)
    return hi - lo  # 0 for an empty tensor


def _disjoint(a: torch.Tensor, a_ext: int, b: torch.Tensor, b_ext: int) -> bool:
    """`_check_alias`'s overlap test from extents measured when the plan was made."""
    if not a_ext or not b_ext:
        return True  # an empty tensor overlaps nothing
    a0 = a.data_ptr()
    b0 = b.data_ptr()
    return a0 >= b0 + b_ext or b0 >= a0 + a_ext


@functools.cache
def _norm_meta(n: int, has_residual: bool, quant: bool) -> dict[str, Any]:
    block = triton.next_power_of_2(n)
    return dict(
        HAS_RESIDUAL=has_residual,
        QUANT=quant,
        FP8_MAX_=FP8_MAX,
        BLOCK=block,
        num_warps=_row_warps(block),
    )


def _norm_args(
    x: torch.Tensor,
    r: torch.Tensor,
    out: torch.Tensor,
    ro: torch.Tensor,
    eps: float,
) -> tuple[Any, ...]:
    """The scalar `_rmsnorm_kernel` arguments."""
    return (x.stride(0), r.stride(0), out.stride(0), ro.stride(0), x.shape[1], eps, FP8_MIN_AMAX)


def _launch_norm(
    op: str,
    rows: int,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    res_out: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
) -> None:
    """One `_rmsnorm_kernel` launch over the first ``rows`` rows. ``residual``: add it first
    (sum -> ``res_out``); ``scale``: ``out`` is float8 and gets the per-row quantisation."""
    r = x if residual is None else residual
    ro = out if res_out is None else res_out
    _launch(
        op,
        "_rmsnorm_kernel",
        (rows,),
        x.device,
        x, r, weight, out, ro, out if scale is None else scale,
        *_norm_args(x, r, out, ro, eps),
        **_norm_meta(x.shape[1], residual is not None, scale is not None),
    )  # fmt: skip


def _check_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> float:
    _check_device_dtype(op, "x", x)
    _check_2d_rows(op, "x", x)
    _check_vector(op, "weight", weight, x.shape[1], "x", x)
    if x.shape[1] > _MAX_ROW:
        raise ValueError(f"{op}: rows of {x.shape[1]} features exceed the supported {_MAX_ROW}")
    return _check_eps(op, eps)


def _check_residual(op: str, x: torch.Tensor, residual: torch.Tensor) -> None:
    _check_2d_rows(op, "residual", residual)
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(
            f"{op}: `residual` shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}"
        )
    _same(op, "x", x, residual=residual)
    _check_alias(op, "residual", residual, "x", x, allow_identical=False)


def _check_fp8_out(op: str, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """`out` [T, K] float8_e4m3fn and `scale` [T, 1] float32 contiguous, on x's device."""
    t = x.shape[0]
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{op}: `out` must be a float8_e4m3fn tensor")
    _check_2d_rows(op, "out", out)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"{op}: `scale` must be a float32 tensor")
    if tuple(scale.shape) != (t, 1) or not scale.is_contiguous():
        raise ValueError(
            f"{op}: `scale` must be a contiguous ({t}, 1) tensor, got "
            f"{tuple(scale.shape)} with strides {tuple(scale.stride())}"
        )
    for name, tt in (("out", out), ("scale", scale)):
        if tt.device != x.device:
            raise ValueError(f"{op}: `{name}` is on {tt.device} but `x` is on {x.device}")


def _compare_fp8(
    op: str, q: torch.Tensor, s: torch.Tensor, want_q: torch.Tensor, want_s: torch.Tensor
) -> None:
    # Scales must agree closely; values within one fp8 step (2**-3 relative) for division
    # rounding differences.
    _compare(op + " (scale)", s, want_s, 1e-5, 0.0)
    _compare(op, q, want_q, 0.13, 2.0**-9)


# --- rmsnorm ------------------------------------------------------------------------------


def _rmsnorm_key(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> tuple[Any, ...] | None:
    if type(eps) is not float:
        return None
    try:
        return (
            "rmsnorm",
            x.shape, x.stride(), x.dtype, x.device,
            weight.shape, weight.stride(), weight.dtype, weight.device,
            out.shape, out.stride(), out.dtype, out.device,
            eps,
        )  # fmt: skip
    except Exception:  # not a strided tensor: no plan; the full checks decide
        return None


def _rmsnorm_cached(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> bool:
    """Run from a plan if one vouches for these arguments; False if the full checks must run."""
    plan = _lookup(_rmsnorm_key(x, weight, eps, out))
    if plan is None:
        return False
    if not _disjoint(out, plan.ext[0], x, plan.ext[1]) and not (
        plan.same and out.data_ptr() == x.data_ptr()  # in place: `out` is `x` itself
    ):
        return False
    _rmsnorm_run(plan, x, weight, out)
    return True


def _rmsnorm_run(plan: _Plan, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    if plan.grid is None:
        return
    op = "rmsnorm"
    eps = plan.eps

    def check() -> None:
        rows = min(x.shape[0], _CHECK_ROWS)
        xs, os_ = x[:rows].clone(), out[:rows].clone()
        _launch_norm(op, rows, xs, None, weight, os_, None, None, eps)
        _compare(op, os_, rmsnorm_ref(x[:rows], weight, eps), *_tol(x.dtype))

    _self_check(plan.check_key, plan.device, check)
    _launch(
        op, "_rmsnorm_kernel", plan.grid, plan.device,
        x, x, weight, out, out, out, *plan.args, **plan.meta,
    )  # fmt: skip


def _rmsnorm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    if _rmsnorm_cached(x, weight, eps, out):
        return
    op = "rmsnorm"
    key = _rmsnorm_key(x, weight, eps, out)
    eps = _check_norm_args(op, x, weight, eps)
    _check_2d_rows(op, "out", out)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{op}: `out` shape {tuple(out.shape)} must equal x's {tuple(x.shape)}")
    _same(op, "x", x, out=out)
    _check_alias(op, "out", out, "x", x, allow_identical=True)
    t, n = x.shape
    grid = (t,) if t and n else None
    plan = _Plan(
        x.device,
        grid,
        _norm_args(x, x, out, out, eps),
        _norm_meta(n, False, False) if grid else None,
        (op, x.device, x.dtype, n),
        eps,
        (_extent(out), _extent(x)),
        out.stride() == x.stride(),  # shapes and dtypes are equal (checked above)
    )
    _rmsnorm_run(_remember(key, plan), x, weight, out)


# --- fused_add_rmsnorm --------------------------------------------------------------------


def _fused_add_rmsnorm_key(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[Any, ...] | None:
    if type(eps) is not float:
        return None
    try:
        return (
            "fused_add_rmsnorm",
            x.shape, x.stride(), x.dtype, x.device,
            residual.shape, residual.stride(), residual.dtype, residual.device,
            weight.shape, weight.stride(), weight.dtype, weight.device,
            eps,
        )  # fmt: skip
    except Exception:
        return None


def _fused_add_rmsnorm_cached(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> bool:
    plan = _lookup(_fused_add_rmsnorm_key(x, residual, weight, eps))
    if plan is None or not _disjoint(residual, plan.ext[0], x, plan.ext[1]):
        return False
    _fused_add_rmsnorm_run(plan, x, residual, weight)
    return True


def _fused_add_rmsnorm_run(
    plan: _Plan, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
) -> None:
    if plan.grid is None:
        return
    op = "fused_add_rmsnorm"
    eps = plan.eps

    def check() -> None:
        rows = min(x.shape[0], _CHECK_ROWS)
        xs, rs = x[:rows].clone(), residual[:rows].clone()
        summed = x[:rows] + residual[:rows]
        want = rmsnorm_ref(summed, weight, eps)
        _launch_norm(op, rows, xs, rs, weight, xs, rs, None, eps)
        _compare(op + " (residual)", rs, summed, 0.0, 0.0)
        _compare(op, xs, want, *_tol(x.dtype))

    _self_check(plan.check_key, plan.device, check)
    _launch(
        op, "_rmsnorm_kernel", plan.grid, plan.device,
        x, residual, weight, x, residual, x, *plan.args, **plan.meta,
    )  # fmt: skip


def _fused_add_rmsnorm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    if _fused_add_rmsnorm_cached(x, residual, weight, eps):
        return
    op = "fused_add_rmsnorm"
    key = _fused_add_rmsnorm_key(x, residual, weight, eps)
    eps = _check_norm_args(op, x, weight, eps)
    _check_residual(op, x, residual)
    t, n = x.shape
    grid = (t,) if t and n else None
    plan = _Plan(
        x.device,
        grid,
        _norm_args(x, residual, x, residual, eps),
        _norm_meta(n, True, False) if grid else None,
        (op, x.device, x.dtype, n),
        eps,
        (_extent(residual), _extent(x)),
    )
    _fused_add_rmsnorm_run(_remember(key, plan), x, residual, weight)


# --- rmsnorm_fp8 / fused_add_rmsnorm_fp8 --------------------------------------------------


def _rmsnorm_quant_key(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[Any, ...] | None:
    if type(eps) is not float:
        return None
    try:
        key = (
            "rmsnorm_fp8",
            x.shape, x.stride(), x.dtype, x.device,
            weight.shape, weight.stride(), weight.dtype, weight.device,
            out.shape, out.stride(), out.dtype, out.device,
            scale.shape, scale.stride(), scale.dtype, scale.device,
            eps,
        )  # fmt: skip
        if residual is None:
            return key
        return (
            "fused_add_rmsnorm_fp8",
            key,
            residual.shape, residual.stride(), residual.dtype, residual.device,
        )  # fmt: skip
    except Exception:
        return None


def _rmsnorm_quant_cached(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    scale: torch.Tensor,
) -> bool:
    plan = _lookup(_rmsnorm_quant_key(x, residual, weight, eps, out, scale))
    if plan is None:
        return False
    if residual is not None and not _disjoint(residual, plan.ext[0], x, plan.ext[1]):
        return False
    _rmsnorm_quant_run(plan, x, residual, weight, out, scale)
    return True


def _rmsnorm_quant_run(
    plan: _Plan,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    if plan.grid is None:
        return
    op = "rmsnorm_fp8" if residual is None else "fused_add_rmsnorm_fp8"
    eps = plan.eps

    def check() -> None:
        rows = min(x.shape[0], _CHECK_ROWS)
        q, s = out[:rows].clone(), scale[:rows].clone()
        rs = None if residual is None else residual[:rows].clone()
        summed = x[:rows] if residual is None else x[:rows] + residual[:rows]
        _launch_norm(op, rows, x, rs, weight, q, rs, s, eps)
        if rs is not None:
            _compare(op + " (residual)", rs, summed, 0.0, 0.0)
        _compare_fp8(op, q, s, *fp8_quant_per_token_ref(rmsnorm_ref(summed, weight, eps)))

    _self_check(plan.check_key, plan.device, check)
    r = x if residual is None else residual
    ro = out if residual is None else residual
    _launch(
        op, "_rmsnorm_kernel", plan.grid, plan.device,
        x, r, weight, out, ro, scale, *plan.args, **plan.meta,
    )  # fmt: skip


def _rmsnorm_quant_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """RMSNorm (after ``residual <- x + residual`` when a residual is given) whose output goes
    straight to per-token fp8: ``out`` [T, N] float8_e4m3fn, ``scale`` [T, 1] float32. ``x``
    is only read."""
    if _rmsnorm_quant_cached(x, residual, weight, eps, out, scale):
        return
    op = "rmsnorm_fp8" if residual is None else "fused_add_rmsnorm_fp8"
    key = _rmsnorm_quant_key(x, residual, weight, eps, out, scale)
    eps = _check_norm_args(op, x, weight, eps)
    if residual is not None:
        _check_residual(op, x, residual)
    _check_fp8_out(op, x, out, scale)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{op}: `out` shape {tuple(out.shape)} must equal x's {tuple(x.shape)}")
    t, n = x.shape
    if t and not n:
        raise ValueError(f"{op}: `x` has no columns")
    r = x if residual is None else residual
    ro = out if residual is None else residual
    grid = (t,) if t else None
    plan = _Plan(
        x.device,
        grid,
        _norm_args(x, r, out, ro, eps),
        _norm_meta(n, residual is not None, True) if grid else None,
        (op, x.device, x.dtype, n),
        eps,
        () if residual is None else (_extent(residual), _extent(x)),
    )
    _rmsnorm_quant_run(_remember(key, plan), x, residual, weight, out, scale)


def _rmsnorm_fp8_impl(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, scale: torch.Tensor
) -> None:
    _rmsnorm_quant_impl(x, None, weight, eps, out, scale)


def _fused_add_rmsnorm_fp8_impl(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    _rmsnorm_quant_impl(x, residual, weight, eps, out, scale)


# --- qk_norm_rope_ ------------------------------------------------------------------------


def _qk_norm_rope_key(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[Any, ...] | None:
    if (
        type(eps) is not float
        or type(num_heads) is not int
        or type(num_kv_heads) is not int
        or type(head_dim) is not int
    ):
        return None
    try:
        return (
            "qk_norm_rope_",
            qkv.shape, qkv.stride(), qkv.dtype, qkv.device,
            q_weight.shape, q_weight.stride(), q_weight.dtype, q_weight.device,
            k_weight.shape, k_weight.stride(), k_weight.dtype, k_weight.device,
            cos.shape, cos.stride(), cos.dtype, cos.device,
            sin.shape, sin.stride(), sin.dtype, sin.device,
            num_heads, num_kv_heads, head_dim, eps,
        )  # fmt: skip
    except Exception:
        return None


def _qk_norm_rope_cached(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> bool:
    plan = _lookup(
        _qk_norm_rope_key(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps)
    )
    if plan is None:
        return False
    qkv_ext, cos_ext, sin_ext = plan.ext
    if not (_disjoint(qkv, qkv_ext, cos, cos_ext) and _disjoint(qkv, qkv_ext, sin, sin_ext)):
        return False
    _qk_norm_rope_run(plan, qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim)
    return True


def _qk_norm_rope_run(
    plan: _Plan,
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    grid = plan.grid
    if grid is None:
        return
    op = "qk_norm_rope_"
    eps = plan.eps
    meta = plan.meta

    def check() -> None:
        rows = min(qkv.shape[0], _CHECK_ROWS)
        buf = qkv[:rows].clone()
        q_sz, k_sz = num_heads * head_dim, num_kv_heads * head_dim
        q = buf[:, :q_sz].view(rows, num_heads, head_dim)
        k = buf[:, q_sz : q_sz + k_sz].view(rows, num_kv_heads, head_dim)
        want_q = rope_ref(rmsnorm_ref(q, q_weight, eps), cos[:rows], sin[:rows])
        want_k = rope_ref(rmsnorm_ref(k, k_weight, eps), cos[:rows], sin[:rows])
        want_v = buf[:, q_sz + k_sz :].clone()
        _launch(
            op,
            "_qk_norm_rope_kernel",
            (rows, grid[1]),
            qkv.device,
            buf,
            q_weight,
            k_weight,
            cos,
            sin,
            buf.stride(0),
            cos.stride(0),
            sin.stride(0),
            num_heads,
            num_heads + num_kv_heads,
            eps,
            **meta,
        )
        rtol, atol = _tol(qkv.dtype)
        if num_heads:
            _compare(op + " (q)", q, want_q, 2 * rtol, 2 * atol)
        _compare(op + " (k)", k, want_k, 2 * rtol, 2 * atol)
        _compare(op + " (v untouched)", buf[:, q_sz + k_sz :], want_v, 0.0, 0.0)

    _self_check(plan.check_key, plan.device, check)
    _launch(
        op, "_qk_norm_rope_kernel", grid, plan.device,
        qkv, q_weight, k_weight, cos, sin, *plan.args, **meta,
    )  # fmt: skip


def _qk_norm_rope_impl(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> None:
    if _qk_norm_rope_cached(
        qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps
    ):
        return
    op = "qk_norm_rope_"
    key = _qk_norm_rope_key(
        qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps
    )
    _check_device_dtype(op, "qkv", qkv)
    _check_2d_rows(op, "qkv", qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 0:
        raise ValueError(f"{op}: `num_heads` must be an int >= 0 (0: k only), got {num_heads!r}")
    for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{op}: `{name}` must be a positive int, got {val!r}")
    if head_dim % 2 or head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"{op}: `head_dim` must be even and <= {_MAX_HEAD_DIM}, got {head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(
            f"{op}: `qkv` has {qkv.shape[1]} columns, expected (num_heads + 2 * num_kv_heads) * "
            f"head_dim = ({num_heads} + 2 * {num_kv_heads}) * {head_dim} = {width}"
        )
    _check_vector(op, "q_weight", q_weight, head_dim, "qkv", qkv)
    _check_vector(op, "k_weight", k_weight, head_dim, "qkv", qkv)
    t = qkv.shape[0]
    for name, cs in (("cos", cos), ("sin", sin)):
        if not isinstance(cs, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(cs).__name__}")
        if cs.dim() != 2 or tuple(cs.shape) != (t, head_dim):
            raise ValueError(
                f"{op}: `{name}` must have shape ({t}, {head_dim}) [tokens, head_dim], got "
                f"{tuple(cs.shape)}"
            )
        if head_dim > 1 and cs.stride(1) != 1:
            raise ValueError(f"{op}: last dim of `{name}` must have stride 1")
        if not cs.is_floating_point():
            raise TypeError(f"{op}: `{name}` must be floating point, got {cs.dtype}")
        if cs.device != qkv.device:
            raise ValueError(f"{op}: `{name}` is on {cs.device} but `qkv` is on {qkv.device}")
        _check_alias(op, "qkv", qkv, name, cs, allow_identical=False)
    eps = _check_eps(op, eps)
    ext = (_extent(qkv), _extent(cos), _extent(sin))
    if t == 0:
        plan = _Plan(qkv.device, None, eps=eps, ext=ext)
    else:
        half = head_dim // 2
        block_half = triton.next_power_of_2(half)
        heads_qk = num_heads + num_kv_heads
        # ~2K elements per tile: the q and k heads of a token in one or a few programs.
        block_h = max(1, min(triton.next_power_of_2(heads_qk), max(1, 2048 // block_half)))
        warps = 4 if block_h * block_half <= 1024 else 8
        plan = _Plan(
            qkv.device,
            (t, triton.cdiv(heads_qk, block_h)),
            (qkv.stride(0), cos.stride(0), sin.stride(0), num_heads, heads_qk, eps),
            dict(
                HEAD_DIM=head_dim,
                HALF=half,
                BLOCK_HALF=block_half,
                BLOCK_H=block_h,
                num_warps=warps,
            ),
            (op, qkv.device, qkv.dtype, head_dim, block_h),
            eps,
            ext,
        )
    _qk_norm_rope_run(
        _remember(key, plan), qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim
    )


# --- silu_and_mul -------------------------------------------------------------------------

_SILU_BLOCK = 1024


def _two_key(op: str, x: torch.Tensor, out: torch.Tensor) -> tuple[Any, ...] | None:
    try:
        return (
            op,
            x.shape, x.stride(), x.dtype, x.device,
            out.shape, out.stride(), out.dtype, out.device,
        )  # fmt: skip
    except Exception:
        return None


def _silu_and_mul_cached(x: torch.Tensor, out: torch.Tensor) -> bool:
    plan = _lookup(_two_key("silu_and_mul", x, out))
    if plan is None or not _disjoint(out, plan.ext[0], x, plan.ext[1]):
        return False
    _silu_and_mul_run(plan, x, out)
    return True


def _silu_and_mul_run(plan: _Plan, x: torch.Tensor, out: torch.Tensor) -> None:
    grid = plan.grid
    if grid is None:
        return
    op = "silu_and_mul"

    def check() -> None:
        rows = min(x.shape[0], _CHECK_ROWS)
        o = out[:rows].clone()
        _launch(
            op,
            "_silu_and_mul_kernel",
            (rows, grid[1]),
            x.device,
            x,
            o,
            x.stride(0),
            o.stride(0),
            x.shape[1] // 2,
            **plan.meta,
        )
        _compare(op, o, silu_and_mul_ref(x[:rows]), *_tol(x.dtype))

    _self_check(plan.check_key, plan.device, check)
    _launch(op, "_silu_and_mul_kernel", grid, plan.device, x, out, *plan.args, **plan.meta)


def _silu_and_mul_impl(x: torch.Tensor, out: torch.Tensor) -> None:
    if _silu_and_mul_cached(x, out):
        return
    op = "silu_and_mul"
    key = _two_key(op, x, out)
    _check_device_dtype(op, "x", x)
    _check_2d_rows(op, "x", x)
    _check_2d_rows(op, "out", out)
    if x.shape[1] % 2:
        raise ValueError(
            f"{op}: `x` must have an even number of columns [gate | up], got {x.shape[1]}"
        )
    inter = x.shape[1] // 2
    if tuple(out.shape) != (x.shape[0], inter):
        raise ValueError(
            f"{op}: `out` shape {tuple(out.shape)} must be ({x.shape[0]}, {inter}) for x of "
            f"shape {tuple(x.shape)}"
        )
    _same(op, "x", x, out=out)
    _check_alias(op, "out", out, "x", x, allow_identical=False)
    t = x.shape[0]
    ext = (_extent(out), _extent(x))
    if t == 0 or inter == 0:
        plan = _Plan(x.device, None, ext=ext)
    else:
        block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
        grid = (t, triton.cdiv(inter, block))
        if grid[1] > 65535:
            raise ValueError(f"{op}: intermediate size {inter} is too large")
        plan = _Plan(
            x.device,
            grid,
            (x.stride(0), out.stride(0), inter),
            dict(BLOCK=block, num_warps=4),
            (op, x.device, x.dtype, block),
            ext=ext,
        )
    _silu_and_mul_run(_remember(key, plan), x, out)


# --- fp8_quant_per_token ------------------------------------------------------------------

_QUANT_BLOCK = 2048


def _three_key(
    op: str, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor
) -> tuple[Any, ...] | None:
    try:
        return (
            op,
            x.shape, x.stride(), x.dtype, x.device,
            out.shape, out.stride(), out.dtype, out.device,
            scale.shape, scale.stride(), scale.dtype, scale.device,
        )  # fmt: skip
    except Exception:
        return None


# The two row-quantising ops (plain per-token quantisation, SiLU-and-mul + quantisation) share
# one launch shape: (x, q, scale, x row stride, q row stride, K, min_amax); op -> (kernel, the
# torch reference of the row values that get quantised).
_ROW_QUANT_OPS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "fp8_quant_per_token": ("_fp8_quant_per_token_kernel", lambda x: x),
    "silu_and_mul_fp8": ("_silu_and_mul_quant_kernel", silu_and_mul_ref),
}


def _row_quant_cached(op: str, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> bool:
    plan = _lookup(_three_key(op, x, out, scale))
    if plan is None:
        return False
    _row_quant_run(op, plan, x, out, scale)
    return True


def _row_quant_run(
    op: str, plan: _Plan, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor
) -> None:
    if plan.grid is None:
        return
    kernel, ref = _ROW_QUANT_OPS[op]
    meta = plan.meta

    def check() -> None:
        rows = min(x.shape[0], _CHECK_ROWS)
        q, s = out[:rows].clone(), scale[:rows].clone()
        _launch(
            op, kernel, (rows,), plan.device,
            x, q, s, x.stride(0), q.stride(0), *plan.args[2:], **meta,
        )  # fmt: skip
        _compare_fp8(op, q, s, *fp8_quant_per_token_ref(ref(x[:rows])))

    _self_check(plan.check_key, plan.device, check)
    _launch(op, kernel, plan.grid, plan.device, x, out, scale, *plan.args, **meta)


def _fp8_quant_impl(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    op = "fp8_quant_per_token"
    if _row_quant_cached(op, x, out, scale):
        return
    key = _three_key(op, x, out, scale)
    _check_device_dtype(op, "x", x)
    _check_2d_rows(op, "x", x)
    _check_fp8_out(op, x, out, scale)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{op}: `out` shape {tuple(out.shape)} must equal x's {tuple(x.shape)}")
    t, k = x.shape
    if t == 0:
        plan = _Plan(x.device, None)
    else:
        if k == 0:
            raise ValueError(f"{op}: `x` has no columns")
        block = min(_QUANT_BLOCK, triton.next_power_of_2(k))
        plan = _Plan(
            x.device,
            (t,),
            (x.stride(0), out.stride(0), k, FP8_MIN_AMAX),
            dict(FP8_MAX_=FP8_MAX, BLOCK=block, num_warps=4 if block <= 1024 else 8),
            (op, x.device, x.dtype, block),
        )
    _row_quant_run(op, _remember(key, plan), x, out, scale)


# --- silu_and_mul_fp8 ---------------------------------------------------------------------

_MAX_QUANT_ROW = 16384  # widest SiLU-and-mul row quantised in one tile


def _silu_and_mul_fp8_impl(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """``silu(gate) * up`` rounded to x's dtype, then per-token fp8 (``out``, ``scale``)."""
    op = "silu_and_mul_fp8"
    if _row_quant_cached(op, x, out, scale):
        return
    key = _three_key(op, x, out, scale)
    _check_device_dtype(op, "x", x)
    _check_2d_rows(op, "x", x)
    if x.shape[1] % 2:
        raise ValueError(
            f"{op}: `x` must have an even number of columns [gate | up], got {x.shape[1]}"
        )
    _check_fp8_out(op, x, out, scale)
    t, inter = x.shape[0], x.shape[1] // 2
    if tuple(out.shape) != (t, inter):
        raise ValueError(
            f"{op}: `out` shape {tuple(out.shape)} must be ({t}, {inter}) for x of shape "
            f"{tuple(x.shape)}"
        )
    if inter > _MAX_QUANT_ROW:
        raise ValueError(f"{op}: intermediate size {inter} exceeds the supported {_MAX_QUANT_ROW}")
    if t == 0:
        plan = _Plan(x.device, None)
    else:
        if inter == 0:
            raise ValueError(f"{op}: `x` has no columns")
        block = triton.next_power_of_2(inter)
        plan = _Plan(
            x.device,
            (t,),
            (x.stride(0), out.stride(0), inter, FP8_MIN_AMAX),
            dict(FP8_MAX_=FP8_MAX, BLOCK=block, num_warps=_row_warps(block)),
            (op, x.device, x.dtype, block),
        )
    _row_quant_run(op, _remember(key, plan), x, out, scale)


# ----------------------------------------------------------------------------------------
# torch.library registration: torch.ops.slipstream.<name>, mutating exactly what they declare.
# ----------------------------------------------------------------------------------------

_SCHEMAS: dict[str, tuple[str, Callable[..., None]]] = {
    "fused_rmsnorm": (
        "fused_rmsnorm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()",
        _rmsnorm_impl,
    ),
    "fused_add_rmsnorm_": (
        "fused_add_rmsnorm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()",
        _fused_add_rmsnorm_impl,
    ),
    "qk_norm_rope_": (
        "qk_norm_rope_(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, Tensor cos, "
        "Tensor sin, int num_heads, int num_kv_heads, int head_dim, float eps) -> ()",
        _qk_norm_rope_impl,
    ),
    "fused_silu_and_mul": (
        "fused_silu_and_mul(Tensor x, Tensor(a!) out) -> ()",
        _silu_and_mul_impl,
    ),
    "fp8_quant_per_token": (
        "fp8_quant_per_token(Tensor x, Tensor(a!) out, Tensor(b!) scale) -> ()",
        _fp8_quant_impl,
    ),
    "fused_rmsnorm_fp8": (
        "fused_rmsnorm_fp8(Tensor x, Tensor weight, float eps, Tensor(a!) out, "
        "Tensor(b!) scale) -> ()",
        _rmsnorm_fp8_impl,
    ),
    "fused_add_rmsnorm_fp8": (
        "fused_add_rmsnorm_fp8(Tensor x, Tensor(a!) residual, Tensor weight, float eps, "
        "Tensor(b!) out, Tensor(c!) scale) -> ()",
        _fused_add_rmsnorm_fp8_impl,
    ),
    "fused_silu_and_mul_fp8": (
        "fused_silu_and_mul_fp8(Tensor x, Tensor(a!) out, Tensor(b!) scale) -> ()",
        _silu_and_mul_fp8_impl,
    ),
}


def _fake(*args: Any, **kwargs: Any) -> None:
    return None  # mutates its declared outputs in place; allocates nothing


# Keep the Library alive (its registrations die with it); register once even on reload.
_LIB: torch.library.Library | None = globals().get("_LIB")
if _LIB is None:
    _LIB = register_ops([(name, schema, impl, _fake) for name, (schema, impl) in _SCHEMAS.items()])


# ----------------------------------------------------------------------------------------
# Public wrappers
#
# In plain eager mode (`_library.eager_direct_ok`) a wrapper replays a cached plan itself, skipping the torch.ops
# dispatcher (its boxing costs several microseconds a call). It calls the op whenever there is
# no plan for the arguments (the op's implementation then runs the full checks and records one),
# and whenever something may be watching: torch.compile / make_fx / export tracing, a Python
# dispatch or torch-function mode, functorch transforms, tensor subclasses, or the profiler (so
# profiles still show the named slipstream:: op).
# ----------------------------------------------------------------------------------------


def rmsnorm(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N], same dtype as x
    eps: float,
    out: torch.Tensor | None = None,  # like x; may be x itself (in place)
) -> torch.Tensor:
    """``weight * rmsnorm(x)`` with RMSNorm's rounding order; returns ``out``."""
    x2 = _rows_of("rmsnorm", "x", x)
    if out is None:
        out = torch.empty_like(x2)
        o2 = out
    else:
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"rmsnorm: `out` shape {tuple(out.shape)} must equal x's {tuple(x.shape)}"
            )
        o2 = _rows_of("rmsnorm", "out", out)
    eps = float(eps)
    if not (eager_direct_ok(x2, weight, o2) and _rmsnorm_cached(x2, weight, eps, o2)):
        torch.ops.slipstream.fused_rmsnorm(x2, weight, eps, o2)
    return o2.view(x.shape)


def fused_add_rmsnorm(
    x: torch.Tensor,  # [T, N]: overwritten with the normalised output
    residual: torch.Tensor,  # [T, N]: overwritten with x + residual
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``residual <- x + residual`` (rounded to the dtype) and ``x <- weight *
    rmsnorm(residual)``; returns ``(x, residual)``, i.e. ``(normed, new_residual)``.

    Both input buffers are consumed: the pre-norm block never reads the old values again, so
    writing in place saves two [T, N] allocations per layer. Callers that still need the inputs
    must pass copies.
    """
    eps = float(eps)
    if not (
        eager_direct_ok(x, residual, weight) and _fused_add_rmsnorm_cached(x, residual, weight, eps)
    ):
        torch.ops.slipstream.fused_add_rmsnorm_(x, residual, weight, eps)
    return x, residual


def qk_norm_rope_(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D], the qkv projection output (any row stride)
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    cos: torch.Tensor,  # [T, D] (float32 from RotaryEmbedding.cos_sin)
    sin: torch.Tensor,  # [T, D]
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> None:
    """Per-head RMSNorm of q and k followed by NeoX rotary, written in place into ``qkv``.

    q and k stay strided views of ``qkv`` afterwards; v's columns are never written. With
    ``num_heads=0`` and ``qkv`` the k|v columns only, k alone is done (when the attention kernel
    applies q's norm and rotary itself: ``flash_attn_varlen(..., q_norm_weight=...)``).
    """
    args = (int(num_heads), int(num_kv_heads), int(head_dim), float(eps))
    if not (
        eager_direct_ok(qkv, q_weight, k_weight, cos, sin)
        and _qk_norm_rope_cached(qkv, q_weight, k_weight, cos, sin, *args)
    ):
        torch.ops.slipstream.qk_norm_rope_(qkv, q_weight, k_weight, cos, sin, *args)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2I] holding [gate | up]
    out: torch.Tensor | None = None,  # [T, I]
) -> torch.Tensor:  # [T, I]
    """``silu(gate) * up`` in one pass."""
    if x.dim() != 2:
        raise ValueError(f"silu_and_mul: `x` must be 2-D [tokens, 2*I], got {tuple(x.shape)}")
    if out is None:
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    if not (eager_direct_ok(x, out) and _silu_and_mul_cached(x, out)):
        torch.ops.slipstream.fused_silu_and_mul(x, out)
    return out


def fp8_quant_per_token(
    x: torch.Tensor,  # [T, K]
    out: torch.Tensor | None = None,  # [T, K] float8_e4m3fn
    scale: torch.Tensor | None = None,  # [T, 1] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 quantisation: ``x ~= out * scale`` with scale = rowmax|x| / 448."""
    if x.dim() != 2:
        raise ValueError(f"fp8_quant_per_token: `x` must be 2-D [tokens, K], got {tuple(x.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if scale is None:
        scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if not (
        eager_direct_ok(x, out, scale) and _row_quant_cached("fp8_quant_per_token", x, out, scale)
    ):
        torch.ops.slipstream.fp8_quant_per_token(x, out, scale)
    return out, scale


def _fp8_buffers(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device),
        torch.empty(rows, 1, dtype=torch.float32, device=device),
    )


def rmsnorm_fp8(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, N] float8_e4m3fn, [T, 1] float32)
    """``fp8_quant_per_token(rmsnorm(x, weight, eps))`` in one pass (x is only read)."""
    if x.dim() != 2:
        raise ValueError(f"rmsnorm_fp8: `x` must be 2-D [tokens, N], got {tuple(x.shape)}")
    out, scale = _fp8_buffers(x.shape[0], x.shape[1], x.device)
    eps = float(eps)
    if not (eager_direct_ok(x, weight) and _rmsnorm_quant_cached(x, None, weight, eps, out, scale)):
        torch.ops.slipstream.fused_rmsnorm_fp8(x, weight, eps, out, scale)
    return out, scale


def fused_add_rmsnorm_fp8(
    x: torch.Tensor,  # [T, N]: read only
    residual: torch.Tensor,  # [T, N]: overwritten with x + residual
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (q, scale, new residual)
    """``residual <- x + residual`` in place, and the per-token fp8 quantisation of
    ``rmsnorm(residual) * weight``: returns ``(q [T, N] float8_e4m3fn, scale [T, 1], residual)``.
    """
    if x.dim() != 2:
        raise ValueError(
            f"fused_add_rmsnorm_fp8: `x` must be 2-D [tokens, N], got {tuple(x.shape)}"
        )
    out, scale = _fp8_buffers(x.shape[0], x.shape[1], x.device)
    eps = float(eps)
    if not (
        eager_direct_ok(x, residual, weight)
        and _rmsnorm_quant_cached(x, residual, weight, eps, out, scale)
    ):
        torch.ops.slipstream.fused_add_rmsnorm_fp8(x, residual, weight, eps, out, scale)
    return out, scale, residual


def silu_and_mul_fp8(
    x: torch.Tensor,  # [T, 2I] holding [gate | up]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, I] float8_e4m3fn, [T, 1] float32)
    """``fp8_quant_per_token(silu(gate) * up)`` in one pass."""
    if x.dim() != 2:
        raise ValueError(f"silu_and_mul_fp8: `x` must be 2-D [tokens, 2*I], got {tuple(x.shape)}")
    out, scale = _fp8_buffers(x.shape[0], x.shape[1] // 2, x.device)
    if not (eager_direct_ok(x) and _row_quant_cached("silu_and_mul_fp8", x, out, scale)):
        torch.ops.slipstream.fused_silu_and_mul_fp8(x, out, scale)
    return out, scale
