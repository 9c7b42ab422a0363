"""The Triton "flash" backend: attention written straight into the layer's buffer."""

from __future__ import annotations

from typing import ClassVar

import torch

from slipstream.attention.base import AttentionBackend, AttentionMetadata
from slipstream.kernels.flash_attn import flash_attn_varlen


class FlashAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "flash"
    writes_in_place: ClassVar[bool] = True

    def forward(
        self,
        q: torch.Tensor,  # [T_q, Hq, D] (strided view of the qkv projection is fine)
        k: torch.Tensor,  # [T_k, Hkv, D]
        v: torch.Tensor,  # [T_k, Hkv, D]
        out: torch.Tensor,  # [T_q, Hq, D], the only place the result is written
        meta: AttentionMetadata,
    ) -> None:
        flash_attn_varlen(
            q,
            k,
            v,
            out,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            causal=meta.causal,
            softmax_scale=self.scale,
        )
