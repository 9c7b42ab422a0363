"""Paged attention metadata (generation) and the plain-torch paths shared by the backends.

Generation keeps K/V in a pool of fixed-size pages per layer (``slipstream.kv``). A forward
in the ``PREFILL`` or ``DECODE`` phase hands every attention layer a
:class:`PagedAttentionMetadata`: the per-layer caches, where each new token's K/V goes
(``slot_mapping``), and which pages hold each sequence (``page_table``). Each backend
instance picks its own layer's cache through ``self.layer_id``.

The ``EMBED`` phase never sees this class: it keeps using :class:`AttentionMetadata` and
never touches a cache.

Slot arithmetic: token ``i`` of a sequence lives in page ``page_table[b, i // page_size]`` at
offset ``i % page_size``; its flat slot is ``page * page_size + offset``. The Triton store skips slots ``< 0``; the engine never
produces them (padded CUDA-graph rows write into the reserved scratch page 0 instead), and the
torch path requires slots ``>= 0`` (checking would cost a device sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slipstream.attention.base import AttentionMetadata


@dataclass(frozen=True, slots=True)
class PagedAttentionMetadata(AttentionMetadata):
    """Attention over a paged KV cache.

    Inherited fields describe the *new* tokens of this forward: ``cu_seqlens_q`` / ``seq_lens_q``
    are the extend lengths (1 per sequence in decode). ``seq_lens_k`` / ``max_seqlen_k`` are the
    total KV lengths after this forward's tokens are stored (cached prefix + new tokens), and
    ``cu_seqlens_k`` their running sum (kept for completeness; the paged kernels do not read it).

    Host tuples (``seq_lens_*``, ``prefix_lens``) are exact in eager mode. Under a CUDA graph
    they describe the batch seen at capture time only, so graph-safe paths (decode) must read
    the device tensors ``kv_lens`` / ``page_table`` instead.
    """

    k_caches: tuple[torch.Tensor, ...]  # per layer: [num_pages, page_size, Hkv, D]
    v_caches: tuple[torch.Tensor, ...]  # per layer: [num_pages, page_size, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int64: flat slot of each new token
    page_table: torch.Tensor  # [B, max_pages] int32: pages of each sequence, 0-padded
    kv_lens: torch.Tensor  # [B] int32: cached prefix + new tokens
    prefix_lens_t: torch.Tensor  # [B] int32: cached prefix (tokens not recomputed)
    prefix_lens: tuple[int, ...]  # host copy of prefix_lens_t
    page_size: int
    is_decode: bool  # every sequence has exactly one new token and a graph-safe path is used
    num_kv_splits: int = 1  # decode: split-K factor along the sequence

    def __post_init__(self) -> None:
        assert len(self.k_caches) == len(self.v_caches) >= 1
        assert self.page_size >= 1 and self.num_kv_splits >= 1
        assert len(self.prefix_lens) == len(self.seq_lens_q) == len(self.seq_lens_k)

    @property
    def max_prefix_len(self) -> int:
        return max(self.prefix_lens) if self.prefix_lens else 0


def build_paged_metadata(
    *,
    extend_lens: list[int] | tuple[int, ...],
    prefix_lens: list[int] | tuple[int, ...],
    page_tables: list[list[int]],
    slot_mapping: list[int],
    k_caches: tuple[torch.Tensor, ...],
    v_caches: tuple[torch.Tensor, ...],
    page_size: int,
    device: torch.device,
    is_decode: bool | None = None,
    num_kv_splits: int | None = None,
    num_kv_heads: int | None = None,
) -> PagedAttentionMetadata:
    """Eager metadata from host lists (one host->device copy per tensor, pinned on CUDA)."""
    ext = tuple(int(n) for n in extend_lens)
    pre = tuple(int(n) for n in prefix_lens)
    kv = tuple(e + p for e, p in zip(ext, pre, strict=True))
    b = len(ext)
    assert len(pre) == b == len(page_tables)
    assert len(slot_mapping) == sum(ext)
    pt = page_table_tensor(page_tables, b)
    for i, pages in enumerate(page_tables):
        assert len(pages) * page_size >= kv[i], "page table too short for the sequence"
    cu_q = [0]
    cu_k = [0]
    for e, n in zip(ext, kv, strict=True):
        cu_q.append(cu_q[-1] + e)
        cu_k.append(cu_k[-1] + n)
    host = [
        torch.tensor(cu_q, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
        torch.tensor(slot_mapping, dtype=torch.int64),
        pt,
        torch.tensor(kv, dtype=torch.int32),
        torch.tensor(pre, dtype=torch.int32),
    ]
    if device.type == "cuda":
        host = [t.pin_memory() for t in host]
    cu_q_t, cu_k_t, slots_t, pt_t, kv_t, pre_t = (t.to(device, non_blocking=True) for t in host)
    if is_decode is None:
        is_decode = all(e == 1 for e in ext)
    max_k = max(kv, default=0)
    if num_kv_splits is None:
        num_kv_splits = (
            choose_num_kv_splits(b, num_kv_heads or 1, max_k, device) if is_decode else 1
        )
    return PagedAttentionMetadata(
        cu_seqlens_q=cu_q_t,
        cu_seqlens_k=cu_k_t,
        max_seqlen_q=max(ext, default=0),
        max_seqlen_k=max_k,
        seq_lens_q=ext,
        seq_lens_k=kv,
        causal=True,
        k_caches=k_caches,
        v_caches=v_caches,
        slot_mapping=slots_t,
        page_table=pt_t,
        kv_lens=kv_t,
        prefix_lens_t=pre_t,
        prefix_lens=pre,
        page_size=page_size,
        is_decode=bool(is_decode),
        num_kv_splits=int(num_kv_splits),
    )


def page_table_tensor(
    page_tables: list[list[int]] | tuple[list[int], ...], rows: int
) -> torch.Tensor:
    """Host ``[rows, max_pages] int32``, 0-padded (rows past ``len(page_tables)`` too): one
    tensor construction instead of one per sequence (it runs every decode step)."""
    width = max((len(p) for p in page_tables), default=0) or 1
    flat: list[int] = []
    for pages in page_tables:
        flat.extend(pages)
        flat.extend([0] * (width - len(pages)))
    flat.extend([0] * (width * (rows - len(page_tables))))
    return torch.tensor(flat, dtype=torch.int32).view(rows, width)


def choose_num_kv_splits(
    batch: int,
    num_kv_heads: int,
    max_kv_len: int,
    device: torch.device | str,
    max_splits: int = 16,
    min_tokens_per_split: int = 256,
) -> int:
    """Split-K factor for decode attention.

    Decode has one query per sequence, so a grid of ``batch * num_kv_heads`` programs leaves
    most SMs idle at small batch with long contexts. Splitting the sequence fills roughly two
    waves of SMs, but never below ``min_tokens_per_split`` keys per split (the reduction pass
    is not free). On CPU (the interpreter) splitting only costs time: 1.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or max_kv_len <= min_tokens_per_split:
        return 1
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    programs = max(1, batch * num_kv_heads)
    by_occupancy = math.ceil(2 * sms / programs)
    by_length = math.ceil(max_kv_len / min_tokens_per_split)
    return max(1, min(by_occupancy, by_length, max_splits))


# ----------------------------------------------------------------------------------------
# Plain-torch paths (the "torch" reference backend; runs anywhere, CPU included)
# ----------------------------------------------------------------------------------------


def store_kv_torch(
    k: torch.Tensor,  # [T, Hkv, D] (strided views fine)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Scatter the new tokens' K/V into their slots (the one copy the math needs)."""
    if k.shape[0] == 0:
        return
    kf = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])  # [num_pages * page_size, Hkv, D]
    vf = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
    # Slots must be >= 0 here: filtering them would need a device sync (not graph-safe).
    kf.index_copy_(0, slot_mapping, k.to(kf.dtype))
    vf.index_copy_(0, slot_mapping, v.to(vf.dtype))


def paged_prefill_torch(
    q: torch.Tensor,  # [T, Hq, D] new tokens' queries
    out: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], new tokens already stored
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> None:
    """Per sequence: SDPA of the new queries over (cached prefix + new) keys gathered from the
    pages, bottom-right causal. The result is copied into ``out`` once per sequence."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    group = hq // hkv
    ps = meta.page_size
    sq = 0
    for b, (lq, lk) in enumerate(zip(meta.seq_lens_q, meta.seq_lens_k, strict=True)):
        if lq == 0:
            continue
        n_pages = -(-lk // ps)
        pages = meta.page_table[b, :n_pages].long()
        ks = k_cache[pages].flatten(0, 1)[:lk].transpose(0, 1)  # [Hkv, Lk, D]
        vs = v_cache[pages].flatten(0, 1)[:lk].transpose(0, 1)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        qs = q[sq : sq + lq].transpose(0, 1)  # [Hq, Lq, D]
        if lq == lk:
            res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            qi = torch.arange(lq, device=q.device)[:, None]
            kj = torch.arange(lk, device=q.device)[None, :]
            mask = kj <= qi + (lk - lq)  # bottom-right: the prefix is visible to every query
            res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[sq : sq + lq].copy_(res.transpose(0, 1))
        sq += lq


def paged_decode_torch(
    q: torch.Tensor,  # [B, Hq, D] one query per sequence
    out: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], new token already stored
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    kv_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> None:
    """Vectorised over the batch, reading only device tensors (no host lengths, no sync), so
    it is safe under CUDA-graph capture. Gathers ``max_pages`` pages per sequence: fine for a
    reference, wasteful for long contexts (the Triton kernel reads only the live pages)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    pages = page_table.long()
    kk = k_cache[pages].flatten(1, 2).float()  # [B, L, Hkv, D], L = max_pages * page_size
    vv = v_cache[pages].flatten(1, 2).float()
    qq = q.float().view(b, hkv, group, d)
    scores = torch.einsum("bkgd,blkd->bkgl", qq, kk) * scale  # [B, Hkv, G, L]
    pos = torch.arange(kk.shape[1], device=q.device)
    visible = pos[None, :] < kv_lens[:, None].long()  # [B, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    res = torch.einsum("bkgl,blkd->bkgd", probs, vv)  # [B, Hkv, G, D]
    out.copy_(res.reshape(b, hq, d))
