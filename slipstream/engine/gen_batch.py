"""The generation Batch: what the generation scheduler hands the generation runner."""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.engine.batch import Phase


@dataclass(frozen=True, slots=True)
class GenerationBatch:
    """One forward over the paged KV cache.

    Sequence ``b`` contributes ``extend_lens[b]`` new tokens at positions
    ``prefix_lens[b] ..< prefix_lens[b] + extend_lens[b]`` (its first ``prefix_lens[b]`` tokens
    are already in its pages). ``PREFILL`` may mix prompt chunks and single decode tokens;
    ``DECODE`` has exactly one new token per sequence (and may replay a CUDA graph).
    ``sample_rows`` are the sequences whose last new token is the last known token of the
    request: only those rows get logits and a sampled token.
    """

    phase: Phase
    request_ids: tuple[str, ...]
    token_ids: list[int]  # [T] packed new tokens
    positions: list[int]  # [T]
    cu_seqlens: list[int]  # [B+1] over extend_lens
    extend_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    page_tables: tuple[list[int], ...]  # pages of each sequence, covering prefix + extend
    slot_mapping: list[int]  # [T] flat slot of each new token
    sample_rows: tuple[int, ...]
    page_size: int

    def __post_init__(self) -> None:
        b = len(self.extend_lens)
        assert self.phase in (Phase.PREFILL, Phase.DECODE)
        assert len(self.request_ids) == len(self.prefix_lens) == len(self.page_tables) == b
        assert len(self.cu_seqlens) == b + 1 and self.cu_seqlens[-1] == len(self.token_ids)
        assert len(self.positions) == len(self.slot_mapping) == len(self.token_ids)
        assert all(n >= 1 for n in self.extend_lens)
        if self.phase is Phase.DECODE:
            assert all(n == 1 for n in self.extend_lens)
        for pre, ext, pages in zip(
            self.prefix_lens, self.extend_lens, self.page_tables, strict=True
        ):
            assert len(pages) * self.page_size >= pre + ext

    @property
    def num_seqs(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kv_lens(self) -> tuple[int, ...]:
        return tuple(p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True))
