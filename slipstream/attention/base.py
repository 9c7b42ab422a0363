"""The attention-backend contract.

A backend computes attention for a packed token stream and writes the result into the
``out`` buffer it is handed: ``forward(q, k, v, out, meta) -> None``. A backend that cannot
write in place (the torch reference) says so with ``writes_in_place = False`` and copies its
result into ``out`` exactly once; the copy profiler shows that cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Per-forward description of the packed stream, shared by every layer.

    ``cu_seqlens_*`` live on the compute device; ``seq_lens_*`` are their host copies, so a
    backend that loops over sequences never synchronises with the device.
    """

    cu_seqlens_q: torch.Tensor  # [B+1] int32
    cu_seqlens_k: torch.Tensor  # [B+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    seq_lens_q: tuple[int, ...]
    seq_lens_k: tuple[int, ...]
    causal: bool

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_q)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens_q)

    @classmethod
    def from_seq_lens(
        cls, seq_lens: list[int] | tuple[int, ...], causal: bool, device: torch.device | str
    ) -> AttentionMetadata:
        """Self-attention over packed sequences (q and k cover the same tokens)."""
        lens = tuple(int(n) for n in seq_lens)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)
        mx = max(lens) if lens else 0
        return cls(cu_t, cu_t, mx, mx, lens, lens, causal)


@dataclass(frozen=True, slots=True)
class QNormRope:
    """q's per-head RMSNorm and NeoX rotary, still to be applied: a backend that says
    ``fuses_q_norm_rope(meta)`` receives the raw q and does both as it loads the query tiles
    (q is then read once, never written back)."""

    weight: torch.Tensor  # [D] RMSNorm weight
    cos: torch.Tensor  # [T_q, D/2] half-width NeoX table in q's dtype (cos_sin_half)
    sin: torch.Tensor  # [T_q, D/2]
    eps: float


class AttentionBackend(ABC):
    """One instance per attention layer: it knows the head layout and softmax scale."""

    name: ClassVar[str]
    # True when forward() writes the result straight into ``out`` with no intermediate
    # buffer; False when it computes into a temporary and copies once.
    writes_in_place: ClassVar[bool]

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_id: int = 0
    ) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Which layer this instance serves: paged (generation) metadata holds one KV cache per
        # layer and the backend picks its own.
        self.layer_id = layer_id

    def fuses_q_norm_rope(self, meta: AttentionMetadata) -> bool:
        """Whether ``forward(..., q_norm_rope=...)`` is accepted for this metadata. A backend
        that says no is handed q already normalised and rotated."""
        return False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T_q, Hq, D]
        k: torch.Tensor,  # [T_k, Hkv, D]
        v: torch.Tensor,  # [T_k, Hkv, D]
        out: torch.Tensor,  # [T_q, Hq, D], filled in place
        meta: AttentionMetadata,
        q_norm_rope: QNormRope | None = None,
    ) -> None:
        """Fill ``out`` with attention of q over k/v for every packed sequence. With
        ``q_norm_rope`` (only when ``fuses_q_norm_rope(meta)``), q is raw and the backend
        applies the norm and rotary to it first."""
