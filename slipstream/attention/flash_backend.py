"""The Triton "flash" backend: attention written straight into the layer's buffer."""

from __future__ import annotations

from typing import ClassVar

import torch

from slipstream.attention.base import AttentionBackend, AttentionMetadata
from slipstream.attention.paged import PagedAttentionMetadata
from slipstream.kernels.flash_attn import flash_attn_varlen
from slipstream.kernels.paged_attn import paged_decode_attn, paged_prefill_attn, paged_store_kv


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
        if isinstance(meta, PagedAttentionMetadata):  # generation: PREFILL / DECODE
            self._forward_paged(q, k, v, out, meta)
            return
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
