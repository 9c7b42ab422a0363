"""The attention layer: owns the output buffer and hands it to the backend."""

from __future__ import annotations

import torch
from torch import nn

from slipstream.attention.base import AttentionBackend, AttentionMetadata, QNormRope


class AttentionOutputError(AssertionError):
    """The debug check found that a backend did not fill its output buffer in place."""


class Attention(nn.Module):
    def __init__(self, backend: AttentionBackend, debug_checks: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads = backend.num_heads
        self.num_kv_heads = backend.num_kv_heads
        self.head_dim = backend.head_dim
        self.debug_checks = debug_checks

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D] (may be a strided view of the qkv projection)
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
        q_norm_rope: QNormRope | None = None,  # only if backend.fuses_q_norm_rope(meta)
    ) -> torch.Tensor:  # [T, Hq * D]
        t = q.shape[0]
        # Allocated once per forward per layer; the backend fills it and nothing copies it.
        out = torch.empty(t, self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        if self.debug_checks:
            out.fill_(float("nan"))
            ptr = out.data_ptr()
        o3 = out.view(t, self.num_heads, self.head_dim)
        if q_norm_rope is None:  # (backends written before the argument existed still work)
            self.backend.forward(q, k, v, o3, meta)
        else:
            self.backend.forward(q, k, v, o3, meta, q_norm_rope=q_norm_rope)
        if self.debug_checks:
            self._check_filled(out, ptr)
        return out

    def _check_filled(self, out: torch.Tensor, ptr: int) -> None:
        if out.data_ptr() != ptr:
            raise AttentionOutputError(
                f"backend {self.backend.name!r} replaced the output buffer instead of filling it"
            )
        unwritten = torch.isnan(out).any(dim=-1)
        if bool(unwritten.any()):
            rows = torch.nonzero(unwritten).flatten()[:8].tolist()
            raise AttentionOutputError(
                f"backend {self.backend.name!r} left rows {rows} of the output buffer unwritten "
                f"(or wrote NaN) out of {out.shape[0]}"
            )
