"""The Batch: the one object that crosses from the scheduler to the model runner."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.Enum):
    EMBED = "embed"  # prefill only, no KV cache at all
    PREFILL = "prefill"  # writes K/V into the paged pool (generation)
    DECODE = "decode"  # one token per sequence, reads the pool (generation)


@dataclass(frozen=True, slots=True)
class Batch:
    """Sequences packed end to end: ``token_ids`` is the concatenation, no padding.

    ``positions`` restart at 0 for each sequence and ``cu_seqlens`` holds the running
    offsets, so ``cu_seqlens[-1] == len(token_ids)`` always.
    """

    phase: Phase
    token_ids: list[int]
    positions: list[int]
    cu_seqlens: list[int]  # [B+1]
    seq_lens: tuple[int, ...]
    # index of each sequence in the caller's input list (results go back in input order)
    item_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        assert len(self.cu_seqlens) == len(self.seq_lens) + 1
        assert self.cu_seqlens[-1] == len(self.token_ids) == len(self.positions)
        assert len(self.item_ids) == len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens)

    @classmethod
    def pack(cls, seqs: list[list[int]], item_ids: list[int], phase: Phase = Phase.EMBED) -> Batch:
        token_ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        for s in seqs:
            token_ids.extend(s)
            positions.extend(range(len(s)))
            cu.append(cu[-1] + len(s))
        return cls(phase, token_ids, positions, cu, tuple(len(s) for s in seqs), tuple(item_ids))
