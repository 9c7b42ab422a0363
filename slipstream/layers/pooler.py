"""Pooling of a packed hidden-state stream into one vector per sequence."""

from __future__ import annotations

import torch


def pool(
    hidden: torch.Tensor,  # [T, H]
    cu_seqlens: torch.Tensor,  # [B+1] int32, same device
    seq_lens: tuple[int, ...],
    mode: str,
) -> torch.Tensor:  # [B, H] float32
    if mode == "last":
        return hidden[cu_seqlens[1:].long() - 1].float()
    if mode == "cls":
        return hidden[cu_seqlens[:-1].long()].float()
    if mode == "mean":
        lens = torch.tensor(seq_lens, device=hidden.device)
        seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = torch.zeros(
            len(seq_lens), hidden.shape[1], device=hidden.device, dtype=torch.float32
        )
        sums.index_add_(0, seg, hidden.float())
        return sums / lens.clamp(min=1)[:, None].float()
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
