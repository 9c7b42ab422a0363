"""Rotary position embedding (rotate-half / NeoX layout, as Qwen3 uses)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        # Caches are rebuilt on demand (not parameters, not in the checkpoint).
        self._cos_sin: torch.Tensor | None = None

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # Same float32 expression as transformers' default rope, so positions match exactly.
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.theta ** (exps / self.head_dim))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] float32 for int positions [T]."""
        need = int(positions.max().item()) + 1 if positions.numel() else 1
        cache = self._cos_sin
        if cache is None or cache.shape[0] < need or cache.device != positions.device:
            n = max(need, 4096 if cache is None else 2 * cache.shape[0])
            pos = torch.arange(n, device=positions.device, dtype=torch.float32)
            freqs = pos[:, None] * self._inv_freq(positions.device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = torch.stack((emb.cos(), emb.sin()))  # [2, n, D]
            self._cos_sin = cache
        cs = cache[:, positions]
        return cs[0], cs[1]

    @staticmethod
    def apply(
        x: torch.Tensor,  # [T, H, D]
        cos: torch.Tensor,  # [T, D] float32
        sin: torch.Tensor,  # [T, D] float32
    ) -> torch.Tensor:
        # cos/sin are cast to x's dtype first, as transformers does, so bf16 matches too.
        c = cos.to(x.dtype)[:, None, :]
        s = sin.to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * c + rotated * s
