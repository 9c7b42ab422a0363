"""The Triton "flash" backend: attention written straight into the layer's buffer."""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from slipstream.attention.base import AttentionBackend, AttentionMetadata, QNormRope
from slipstream.attention.paged import PagedAttentionMetadata
from slipstream.kernels.flash_attn import flash_attn_varlen
from slipstream.kernels.paged_attn import paged_decode_attn, paged_prefill_attn, paged_store_kv


class FlashAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "flash"
    writes_in_place: ClassVar[bool] = True

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_id: int = 0
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, layer_id)
        # The varlen kernel can apply q's norm + rotary as it loads each Q tile;
        # SLIPSTREAM_FLASH_QROPE=0 turns that off (A/B), read once per backend instance.
        self._q_rope = os.environ.get("SLIPSTREAM_FLASH_QROPE", "1") != "0"

    def fuses_q_norm_rope(self, meta: AttentionMetadata) -> bool:
        # Packed (embedding) attention only; the paged generation paths take q ready-made.
        return self._q_rope and not isinstance(meta, PagedAttentionMetadata)

    def forward(
        self,
        q: torch.Tensor,  # [T_q, Hq, D] (strided view of the qkv projection is fine)
        k: torch.Tensor,  # [T_k, Hkv, D]
        v: torch.Tensor,  # [T_k, Hkv, D]
        out: torch.Tensor,  # [T_q, Hq, D], the only place the result is written
        meta: AttentionMetadata,
        q_norm_rope: QNormRope | None = None,
    ) -> None:
        if isinstance(meta, PagedAttentionMetadata):  # generation: PREFILL / DECODE
            if q_norm_rope is not None:
                raise ValueError("flash backend: the paged paths take q already rotated")
            self._forward_paged(q, k, v, out, meta)
            return
        rope = q_norm_rope
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
            q_norm_weight=None if rope is None else rope.weight,
            cos=None if rope is None else rope.cos,
            sin=None if rope is None else rope.sin,
            q_norm_eps=1e-6 if rope is None else rope.eps,
        )

    def _forward_paged(
        self,
        q: torch.Tensor,  # [T, Hq, D] new tokens
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        out: torch.Tensor,  # [T, Hq, D], written in place by every path below
        meta: PagedAttentionMetadata,
    ) -> None:
        k_cache = meta.k_caches[self.layer_id]
        v_cache = meta.v_caches[self.layer_id]
        paged_store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            # Reads only device tensors: safe under CUDA-graph capture.
            paged_decode_attn(
                q,
                out,
                k_cache,
                v_cache,
                meta.page_table,
                meta.kv_lens,
                meta.num_kv_splits,
                self.scale,
            )
        elif meta.max_prefix_len == 0:
            # Nothing cached: plain causal varlen attention over the new tokens (the autotuned
            # kernel); their K/V were stored above for the steps that follow.
            flash_attn_varlen(
                q,
                k,
                v,
                out,
                meta.cu_seqlens_q,
                meta.cu_seqlens_q,
                meta.max_seqlen_q,
                meta.max_seqlen_q,
                causal=True,
                softmax_scale=self.scale,
            )
        else:
            paged_prefill_attn(
                q,
                k,
                v,
                out,
                k_cache,
                v_cache,
                meta.page_table,
                meta.cu_seqlens_q,
                meta.prefix_lens_t,
                meta.max_seqlen_q,
                self.scale,
            )
