"""Reference backend: per-sequence ``scaled_dot_product_attention``.

It cannot write into ``out`` (SDPA allocates its result), so it copies each sequence's
result into its rows of ``out`` once. Running each sequence alone also makes it batch
invariant: a sequence's output does not depend on what it is packed with.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from slipstream.attention.base import AttentionBackend, AttentionMetadata, QNormRope
from slipstream.attention.paged import (
    PagedAttentionMetadata,
    paged_decode_torch,
    paged_prefill_torch,
    store_kv_torch,
)


class TorchAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "torch"
    writes_in_place: ClassVar[bool] = False

    def forward(
        self,
        q: torch.Tensor,  # [T_q, Hq, D]
        k: torch.Tensor,  # [T_k, Hkv, D]
        v: torch.Tensor,  # [T_k, Hkv, D]
        out: torch.Tensor,  # [T_q, Hq, D]
        meta: AttentionMetadata,
        q_norm_rope: QNormRope | None = None,
    ) -> None:
        if q_norm_rope is not None:
            raise ValueError("the torch backend does not fuse q's norm and rotary")
        if isinstance(meta, PagedAttentionMetadata):  # generation: PREFILL / DECODE
            self._forward_paged(q, k, v, out, meta)
            return
        group = self.num_heads // self.num_kv_heads
        sq = sk = 0
        for lq, lk in zip(meta.seq_lens_q, meta.seq_lens_k, strict=False):
            if lq == 0:
                sk += lk
                continue
            # 4-D [1, H, L, D] views (no copies): SDPA's fused GPU kernels take 4-D inputs only,
            # and enable_gqa lets them read the shared K/V heads instead of repeating them.
            qs = q[sq : sq + lq].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
            ks = k[sk : sk + lk].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Lk, D]
            vs = v[sk : sk + lk].transpose(0, 1).unsqueeze(0)
            mask = None
            is_causal = False
            if meta.causal and lq > 1:
                if lq == lk:
                    is_causal = True
                else:
                    # bottom-right alignment: query i sees keys j <= i + (lk - lq)
                    qi = torch.arange(lq, device=q.device)[:, None]
                    kj = torch.arange(lk, device=q.device)[None, :]
                    mask = kj <= qi + (lk - lq)
            # (a single query of a causal sequence is its last position: it sees every key)
            res = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scale,
                enable_gqa=group > 1,
            )[0]  # [Hq, Lq, D]
            out[sq : sq + lq].copy_(res.transpose(0, 1))
            sq += lq
            sk += lk

    def _forward_paged(
        self,
        q: torch.Tensor,  # [T, Hq, D] new tokens
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        out: torch.Tensor,  # [T, Hq, D]
        meta: PagedAttentionMetadata,
    ) -> None:
        k_cache = meta.k_caches[self.layer_id]
        v_cache = meta.v_caches[self.layer_id]
        store_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            paged_decode_torch(q, out, k_cache, v_cache, meta.page_table, meta.kv_lens, self.scale)
        else:
            paged_prefill_torch(q, out, k_cache, v_cache, meta, self.scale)
