"""Pooling of a packed hidden-state stream into one vector per sequence."""

from __future__ import annotations

import torch


def pool(
    hidden: torch.Tensor,  # [T, H]
    cu_seqlens: torch.Tensor,  # [B+1] int32, same device
    mode: str,
) -> torch.Tensor:  # [B, H] float32
    """One vector per sequence of a packed stream, from device tensors only: no host lengths
    and no device-to-host sync, so a CUDA graph can capture it. An empty sequence (allowed
    by the packed-batch contract, e.g. graph padding) pools to zeros with ``mean`` and to an
    arbitrary in-range row with ``cls`` / ``last``."""
    t = hidden.shape[0]
    if mode == "last":
        return hidden[(cu_seqlens[1:].long() - 1).clamp(min=0)].float()
    if mode == "cls":
        return hidden[cu_seqlens[:-1].long().clamp(max=max(t - 1, 0))].float()
    if mode == "mean":
        cu = cu_seqlens.long()
        # Token i belongs to the first sequence whose end is past i.
        seg = torch.searchsorted(cu[1:], torch.arange(t, device=hidden.device), right=True)
        sums = torch.zeros(
            cu.shape[0] - 1, hidden.shape[1], device=hidden.device, dtype=torch.float32
        )
        sums.index_add_(0, seg, hidden.float())
        return sums / (cu[1:] - cu[:-1]).clamp(min=1)[:, None].float()
    raise ValueError(f"unknown pooling mode {mode!r}")


def postprocess(
    pooled: torch.Tensor,  # [B, H] float32
    normalize: bool,
    dimensions: int | None,
) -> torch.Tensor:
    """Matryoshka truncation first, then L2 normalisation (as sentence-transformers does)."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
    return pooled
