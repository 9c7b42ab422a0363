"""Rotary position embedding (rotate-half / NeoX layout, as Qwen3 uses)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        # The whole table ([2, max_positions, D] float32, 42 MB for Qwen3's 40960 x 128) is
        # built once per device on first use, so a forward never reads positions back to the
        # host (no device sync, and CUDA-graph capture safe). Not a parameter, not loaded.
        self._cos_sin: torch.Tensor | None = None
        self._half: dict[torch.dtype, torch.Tensor] = {}  # cos_sin_half's tables

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # Same float32 expression as transformers' default rope, so positions match exactly.
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.theta ** (exps / self.head_dim))

    def table(self, device: torch.device) -> torch.Tensor:
        cache = self._cos_sin
        if cache is None or cache.device != device:
            pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self._inv_freq(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = torch.stack((emb.cos(), emb.sin()))  # [2, max_positions, D]
            self._cos_sin = cache
        return cache

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] float32 for int positions [T] in [0, max_positions)."""
        cs = self.table(positions.device)[:, positions]
        return cs[0], cs[1]

    def cos_sin_half(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim / 2] in ``dtype``: the first half of each ``cos_sin`` row (the
        two halves are equal), cast as ``rotate`` casts them. For kernels that read the tables
        once per tile (the flash kernel's q prologue)."""
        half = self.head_dim // 2
        cache = self._half.get(dtype)
        table = self.table(positions.device)
        if cache is None or cache.device != table.device:
            cache = table[:, :, :half].to(dtype)  # [2, max_positions, D/2]
            self._half[dtype] = cache
        cs = cache[:, positions]
        return cs[0], cs[1]

    @staticmethod
    def rotate(
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
