"""Splitting embedding inputs into packed forwards under a token budget."""

from __future__ import annotations

from collections.abc import Sequence

from slipstream.engine.batch import Batch, Phase


def plan_embed_groups(
    seqs: Sequence[Sequence[int]],
    max_batch_tokens: int,
    max_batch_size: int,
) -> list[list[int]]:
    """Indices of ``seqs`` per forward: longest first, greedily filled up to
    ``max_batch_tokens`` tokens and ``max_batch_size`` sequences per forward.

    Longest first puts the expensive forwards at the start (so a progress bar's estimate is
    pessimistic, not optimistic) and groups similar lengths. A single input longer than the
    budget runs alone: ``max_input_tokens`` bounds it, not the budget.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in order:
        n = len(seqs[i])
        if cur and (cur_tokens + n > max_batch_tokens or len(cur) >= max_batch_size):
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        groups.append(cur)
    return groups


def pack_group(
    seqs: Sequence[Sequence[int]], group: list[int], item_ids: Sequence[int] | None = None
) -> Batch:
    """The Batch of one planned group (``item_ids`` default: the indices themselves)."""
    ids = group if item_ids is None else [item_ids[j] for j in group]
    return Batch.pack([seqs[j] for j in group], ids, Phase.EMBED)


def plan_embed_batches(
    seqs: Sequence[Sequence[int]],
    max_batch_tokens: int,
    max_batch_size: int,
    item_ids: list[int] | None = None,
) -> list[Batch]:
    """Every forward of :func:`plan_embed_groups`, packed now (callers that run them one by
    one should pack each group just before its forward instead, as ``Engine`` does)."""
    groups = plan_embed_groups(seqs, max_batch_tokens, max_batch_size)
    return [pack_group(seqs, g, item_ids) for g in groups]
