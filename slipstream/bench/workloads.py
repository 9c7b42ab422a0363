"""Seeded, deterministic benchmark workloads: per-item lengths and random token ids.

Named workloads (lengths drawn per item):

* ``mixed``: with probability 0.50 log-uniform in [8, 128], 0.35 in [256, 1024], 0.15 in
  [2048, 8192] (a search index: many queries and snippets, some documents, a few long ones);
* ``long``: every item 7168 tokens;
* ``short``: log-uniform in [8, 64];
* a path to a JSON file holding a list of lengths (or ``{"lengths": [...]}``).

Token ids are uniform in ``[0, vocab_size)`` minus the ids in ``exclude`` (special tokens such
as EOS), from the same seed, so two runs with the same arguments embed the same inputs.
Lengths are capped at ``max_len`` (the engine's ``max_input_tokens``); how many were capped is
recorded so the report can say so.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slipstream.errors import ConfigError

NAMED_WORKLOADS = ("mixed", "long", "short")
LONG_LEN = 7168

# (probability, low, high) of each log-uniform length bucket of `mixed`.
MIXED_BUCKETS: tuple[tuple[float, int, int], ...] = (
    (0.50, 8, 128),
    (0.35, 256, 1024),
    (0.15, 2048, 8192),
)

_WORDS = (
    "the a of to in and is for on with as by at from that this it model token vector search "
    "query document embedding engine packed batch sequence layer attention kernel memory copy "
    "buffer fast quick brown fox jumps over lazy dog river mountain city light green blue red"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    seed: int
    lengths: tuple[int, ...]
    token_ids: list[list[int]] = field(repr=False)
    cap: int | None = None
    capped_items: int = 0  # items whose drawn length exceeded ``cap`` and were shortened

    def __post_init__(self) -> None:
        assert len(self.lengths) == len(self.token_ids)
        assert all(len(t) == n for t, n in zip(self.token_ids, self.lengths, strict=True))

    @property
    def items(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    def summary(self) -> dict[str, object]:
        lens = sorted(self.lengths)
        return {
            "workload": self.name,
            "seed": self.seed,
            "items": self.items,
            "total_tokens": self.total_tokens,
            "min_len": lens[0] if lens else 0,
            "median_len": lens[len(lens) // 2] if lens else 0,
            "max_len": lens[-1] if lens else 0,
            "length_cap": self.cap,
            "capped_items": self.capped_items,
        }

    def texts(self) -> list[str]:
        """Pseudo-sentences of about one word per token (for text-input benchmarks)."""
        rng = random.Random(self.seed + 1)
        return [" ".join(rng.choice(_WORDS) for _ in range(n)) for n in self.lengths]


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def draw_lengths(name: str, items: int, seed: int = 0) -> list[int]:
    """Uncapped lengths of a named workload."""
    if items < 1:
        raise ConfigError(f"items must be >= 1, got {items}")
    rng = random.Random(seed)
    if name == "long":
        return [LONG_LEN] * items
    if name == "short":
        return [_log_uniform(rng, 8, 64) for _ in range(items)]
    if name == "mixed":
        out = []
        for _ in range(items):
            u = rng.random()
            acc = 0.0
            bucket = MIXED_BUCKETS[-1]
            for b in MIXED_BUCKETS:
                acc += b[0]
                if u < acc:
                    bucket = b
                    break
            out.append(_log_uniform(rng, bucket[1], bucket[2]))
        return out
    raise ConfigError(
        f"unknown workload {name!r}; use one of {', '.join(NAMED_WORKLOADS)} or a JSON file "
        "holding a list of lengths"
    )


def read_lengths_file(path: str | Path) -> list[int]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"workload file {p}: cannot read a JSON list of lengths: {e}") from e
    if isinstance(data, dict):
        data = data.get("lengths")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"workload file {p} must hold a non-empty JSON list of lengths")
    out = []
    for i, n in enumerate(data):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"workload file {p}: entry {i} is {n!r}, not a positive integer")
        out.append(n)
    return out


def make_workload(
    spec: str,
    items: int | None,
    vocab_size: int,
    max_len: int | None = None,
    seed: int = 0,
    exclude: tuple[int, ...] | list[int] = (),
) -> Workload:
    """A workload by name (``mixed``/``long``/``short``) or from a JSON file of lengths.

    For a file, ``items=None`` takes every length; a larger ``items`` cycles through them and
    a smaller one takes the first ``items``.
    """
    if spec in NAMED_WORKLOADS:
        if items is None:
            raise ConfigError(f"workload {spec!r} needs a number of items")
        lengths = draw_lengths(spec, items, seed)
        name = spec
    else:
        if not Path(spec).is_file():
            raise ConfigError(
                f"workload {spec!r} is neither one of {', '.join(NAMED_WORKLOADS)} nor a file"
            )
        base = read_lengths_file(spec)
        n = len(base) if items is None else items
        if n < 1:
            raise ConfigError(f"items must be >= 1, got {n}")
        lengths = [base[i % len(base)] for i in range(n)]
        name = Path(spec).name
    capped = 0
    if max_len is not None:
        capped = sum(1 for n in lengths if n > max_len)
        lengths = [min(n, max_len) for n in lengths]
    return Workload(
        name=name,
        seed=seed,
        lengths=tuple(lengths),
        token_ids=random_token_ids(lengths, vocab_size, seed, exclude),
        cap=max_len,
        capped_items=capped,
    )


def random_token_ids(
    lengths: list[int] | tuple[int, ...],
    vocab_size: int,
    seed: int = 0,
    exclude: tuple[int, ...] | list[int] = (),
) -> list[list[int]]:
    """Uniform token ids in [0, vocab_size) avoiding ``exclude``, one list per length."""
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    allowed = None
    bad = sorted({int(e) for e in exclude if 0 <= int(e) < vocab_size})
    if bad:
        if len(bad) >= vocab_size:
            raise ConfigError("every token id is excluded")
        allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(bad))
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for n in lengths:
        if allowed is None:
            ids = rng.integers(0, vocab_size, size=int(n), dtype=np.int64)
        else:
            ids = allowed[rng.integers(0, len(allowed), size=int(n))]
        out.append(ids.tolist())
    return out
