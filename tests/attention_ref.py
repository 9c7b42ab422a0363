"""Torch references for the attention kernel tests (shared by several test modules)."""

from __future__ import annotations

import math

import torch


def cu_from_lens(lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """[B] lengths -> [B+1] int32 cumulative offsets."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    acc_dtype: torch.dtype = torch.float64,
    head_chunk: int = 64,
) -> torch.Tensor:
    """Per-sequence softmax(Q K^T * scale + mask) V with GQA expansion, in `acc_dtype`.

    q: [T_q, Hq, D], k/v: [T_k, Hkv, D], cu_*: [B+1] -> [T_q, Hq, D] in acc_dtype.
    Causal is bottom-right aligned; rows with no visible key are zero.
    """
    t_q, hq, d = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros((t_q, hq, d), dtype=acc_dtype, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        lq, lk = qe - qs, ke - ks
        if lq == 0 or lk == 0:
            continue
        mask = None
        if causal:
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            mask = j > i + (lk - lq)
        for h0 in range(0, hq, head_chunk):
            h1 = min(hq, h0 + head_chunk)
            qq = q[qs:qe, h0:h1].to(acc_dtype).transpose(0, 1)  # [h, Lq, D]
            kv_heads = torch.arange(h0, h1, device=q.device) // group
            kk = k[ks:ke].to(acc_dtype)[:, kv_heads].transpose(0, 1)  # [h, Lk, D]
            vv = v[ks:ke].to(acc_dtype)[:, kv_heads].transpose(0, 1)
            s = torch.matmul(qq, kk.transpose(1, 2)) * scale
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
            out[qs:qe, h0:h1] = torch.matmul(p, vv).transpose(0, 1)
    return out
