"""Activation functions on merged projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels import fused as fused_ops
from slipstream.layers.fp8 import Fp8Rows


def silu_and_mul(x: torch.Tensor, fused: str = "off", fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """x: [T, 2*I] holding [gate | up] -> silu(gate) * up: [T, I].

    ``fused`` is a fusion mode ('off', 'auto', 'always'); where it applies, one Triton kernel
    replaces the two torch ops (same rounding order). ``fp8``: the consumer is an fp8 GEMM;
    where fusion applies the result comes back quantised per token (:class:`Fp8Rows`).
    """
    if fp8 and x.dim() == 2 and fused_ops.should_fuse(fused, x):
        q, scale = fused_ops.silu_and_mul_fp8(x)
        return Fp8Rows(q, scale, x.dtype)
    if x.dim() == 2 and fused_ops.should_fuse(fused, x):
        return fused_ops.silu_and_mul(x)
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return F.gelu(x)
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unsupported activation {kind!r}")
