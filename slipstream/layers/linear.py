"""Linear layers whose weights may be merged from several checkpoint tensors.

A merged layer (qkv, gate_up) is one GEMM instead of several; the loader fills each
named partition from its own checkpoint tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PartitionedOutput:
    """Named output partitions of a merged weight (shared by Linear and Fp8Linear): the
    loader fills ``weight[partition_slice(name)]`` from the checkpoint tensor ``name``."""

    out_features: int
    partitions: dict[str, tuple[int, int]]

    def _init_partitions(self, out_features: int | list[int], partitions: list[str] | None) -> None:
        sizes = out_features if isinstance(out_features, list) else [out_features]
        if partitions is not None and len(partitions) != len(sizes):
            raise ValueError("one size per partition")
        self.out_features = sum(sizes)
        self.partitions = {}
        if partitions is not None:
            start = 0
            for name, size in zip(partitions, sizes, strict=True):
                self.partitions[name] = (start, size)
                start += size

    def partition_slice(self, shard: str | None) -> slice:
        if shard is None:
            return slice(0, self.out_features)
        start, size = self.partitions[shard]
        return slice(start, start + size)


class Linear(PartitionedOutput, nn.Module):
    """y = x W^T (+ b), with optional named output partitions for merged weights."""

    # The layer feeding this one may hand over fp8-quantised rows only to an Fp8Linear.
    takes_fp8_rows = False

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        partitions: list[str] | None = None,
    ) -> None:
        super().__init__()
        self._init_partitions(out_features, partitions)
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def add_into_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out += x W^T`` in place, as one GEMM whose epilogue adds ``out`` (BLAS beta = 1).

        The residual add of a pre-norm block rides on the projection this way: no separate
        output tensor, and the following norm reads one tensor instead of two. The sum is
        rounded once (the unfused path rounds the product, then the sum). The caller sees
        to the rest: no bias, 2-D operands of the weight's dtype, and a dense ``out`` of shape
        [rows, out_features] (BLAS would work on a copy of a strided one).
        """
        return out.addmm_(x, self.weight.t())
