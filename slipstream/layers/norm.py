"""Normalisation layers with the numerics of the reference implementations."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import nn

from slipstream.kernels import fused as fused_ops
from slipstream.layers.fp8 import Fp8Rows


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers does.

    ``fused``: 'off', 'auto' or 'always' (see ``slipstream.kernels.fused.fusion_mode``); None
    reads ``SLIPSTREAM_FUSED`` now, at construction. Where fusion applies (by default: CUDA,
    bf16/fp16) the Triton kernels replace the torch code with the same rounding order.
    """

    def __init__(self, dim: int, eps: float, fused: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = fused_ops.fusion_mode() if fused is None else fused

    def forward(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Rows:
        """x: [..., dim]. ``fp8``: the consumer is an fp8 GEMM; where fusion applies to a 2-D
        ``x`` the output comes back already quantised per token (:class:`Fp8Rows`)."""
        if fp8 and x.dim() == 2 and fused_ops.should_fuse(self.fused, x):
            q, scale = fused_ops.rmsnorm_fp8(x, self.weight, self.eps)
            return Fp8Rows(q, scale, x.dtype)
        # The kernel takes [rows, dim] with any row stride: 2-D inputs, or contiguous ones.
        if (x.dim() == 2 or x.is_contiguous()) and fused_ops.should_fuse(self.fused, x):
            return fused_ops.rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(dtype)

    @overload
    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: Literal[False] = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: bool
    ) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]: ...

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, fp8: bool = False
    ) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """Return (norm(x + residual), x + residual): the add-then-norm of a pre-norm block.

        The fused path works in place: it overwrites ``x`` with the normalised output and
        ``residual`` with the sum, and returns those two buffers. Callers must treat both
        arguments as consumed (the pre-norm block never reads them again). With ``fp8`` (the
        consumer is an fp8 GEMM) the fused path returns the normalised output quantised per
        token (:class:`Fp8Rows`) instead, in one pass.
        """
        if fp8 and x.dim() == 2 and fused_ops.should_fuse(self.fused, x):
            q, scale, summed = fused_ops.fused_add_rmsnorm_fp8(x, residual, self.weight, self.eps)
            return Fp8Rows(q, scale, x.dtype), summed
        if x.dim() == 2 and fused_ops.should_fuse(self.fused, x):
            return fused_ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self.forward(summed), summed
