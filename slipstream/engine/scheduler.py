"""Splitting embedding inputs into packed forwards under a token budget."""

from __future__ import annotations

from slipstream.engine.batch import Batch, Phase


def plan_embed_batches(
    seqs: list[list[int]],
    max_batch_tokens: int,
    max_batch_size: int,
    item_ids: list[int] | None = None,
) -> list[Batch]:
    """Longest first, greedily filled up to ``max_batch_tokens`` tokens per forward.

    Longest first puts the expensive forwards at the start (so a progress bar's estimate is
    pessimistic, not optimistic) and groups similar lengths. A single input longer than the
    budget runs alone: ``max_input_tokens`` bounds it, not the budget.
    """
    ids = list(range(len(seqs))) if item_ids is None else item_ids
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches: list[Batch] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in order:
        n = len(seqs[i])
        if cur and (cur_tokens + n > max_batch_tokens or len(cur) >= max_batch_size):
            batches.append(Batch.pack([seqs[j] for j in cur], [ids[j] for j in cur], Phase.EMBED))
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        batches.append(Batch.pack([seqs[j] for j in cur], [ids[j] for j in cur], Phase.EMBED))
    return batches
