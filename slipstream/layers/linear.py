"""Linear layers whose weights may be merged from several checkpoint tensors.

A merged layer (qkv, gate_up) is one GEMM instead of several; the loader fills each
named partition from its own checkpoint tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b), with optional named output partitions for merged weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        partitions: list[str] | None = None,
    ) -> None:
        super().__init__()
        sizes = out_features if isinstance(out_features, list) else [out_features]
        if partitions is not None and len(partitions) != len(sizes):
            raise ValueError("one size per partition")
        self.in_features = in_features
        self.out_features = sum(sizes)
        self.partitions: dict[str, tuple[int, int]] = {}
        if partitions is not None:
            start = 0
            for name, size in zip(partitions, sizes, strict=False):
                self.partitions[name] = (start, size)
                start += size
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def partition_slice(self, shard: str | None) -> slice:
        if shard is None:
            return slice(0, self.out_features)
        start, size = self.partitions[shard]
        return slice(start, start + size)
