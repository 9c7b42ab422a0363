"""Sampling parameters and the batched sampler.

Randomness is a pure function of ``(seed, output index)``: a counter-based hash turns it into
one uniform number per row, and the token is drawn by inverting the row's cumulative
distribution. So a seeded request gives the same tokens whatever it is batched with, whether
or not it was preempted and recomputed, with no per-request generator state to carry around
(up to the floating-point differences batching itself causes in the logits). One uniform per
row keeps the sampler cheap at large vocabularies: a cumsum and a binary search per row.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slipstream.errors import InputError

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: x (< 2**32) * C stays below 2**63, so int64 tensor arithmetic
# never overflows on any backend.
_C1 = 0x7FEB352D
_C2 = 0x68E31DA5
_C3 = 0x4F6CDD1D
_GOLDEN = 0x5BD1E995


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings, validated once.

    ``temperature == 0`` (or ``top_k == 1``) is greedy. ``top_k <= 0`` and ``top_p == 1`` disable
    those filters. ``seed=None`` draws a fresh seed when the request is added. ``stop`` strings
    end generation when they appear in the decoded text (cut from the returned text);
    ``stop_token_ids`` and the checkpoint's EOS ids (unless ``ignore_eos``) end it on a token.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InputError("max_new_tokens must be an integer", param="max_new_tokens")
        if self.max_new_tokens < 1:
            raise InputError(
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}", param="max_new_tokens"
            )
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise InputError(
                f"temperature must be finite and >= 0, got {self.temperature}", param="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InputError("top_k must be an integer", param="top_k")
        # Bounds that keep the batched int64 / float32 tensors of SamplingBatch exact: an
        # out-of-range value must fail its own request here, not the whole batch's step.
        if not -1 <= self.top_k < 2**31:
            raise InputError(
                f"top_k must be in [-1, 2**31), got {self.top_k} (0 or -1: no top-k filter)",
                param="top_k",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise InputError(
                f"seed must be an integer in [0, 2**63), got {self.seed}", param="seed"
            )
        # Below these, float32 sampling degenerates (NaN probabilities): treat as greedy /
        # as the single most likely token, which is what the limit means.
        if 0.0 < self.temperature < 1e-5:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_p < 1e-6:
            object.__setattr__(self, "top_p", 1e-6)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise InputError("stop must hold non-empty strings", param="stop")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise InputError(
                "stop_token_ids must hold non-negative integers", param="stop_token_ids"
            )
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def with_seed(self) -> SamplingParams:
        """These parameters with a concrete seed (drawn now when none was given)."""
        if self.seed is not None:
            return self
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=random.getrandbits(62), stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
        )  # fmt: skip


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _C3) & _MASK32
    return x ^ (x >> 15)


def row_uniform(
    seeds: torch.Tensor,  # [B] int64, >= 0
    steps: torch.Tensor,  # [B] int64: the output index being sampled
) -> torch.Tensor:  # [B] float32 in (0, 1)
    """Deterministic uniforms: a pure function of (seed, step)."""
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    x = _mix32(lo ^ _mix32(hi ^ _mix32((steps * _GOLDEN) & _MASK32)))
    # 24 random bits -> (0, 1): never exactly 0 nor 1.
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row sampling settings as device tensors (built once per step)."""

    temperatures: torch.Tensor  # [B] float32 (greedy rows: 1.0, ignored)
    top_ks: torch.Tensor  # [B] int64 (<= 0: off)
    top_ps: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    need_filter: bool  # some row uses top-k or top-p

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], steps: Sequence[int], device: torch.device
    ) -> SamplingBatch:
        greedy = [p.greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        seeds = [p.seed or 0 for p in params]
        need_filter = any(
            not g and ((0 < k) or p < 1.0) for g, k, p in zip(greedy, top_ks, top_ps, strict=True)
        )

        def t(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

        return cls(
            temperatures=t(temps, torch.float32),
            top_ks=t(top_ks, torch.int64),
            top_ps=t(top_ps, torch.float32),
            seeds=t(seeds, torch.int64),
            steps=t(list(steps), torch.int64),
            greedy=t(greedy, torch.bool),
            all_greedy=all(greedy),
            need_filter=need_filter,
        )


def filtered_probs(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``[B, V]`` float32 logits: returns the
    renormalised distribution each sampled row draws from."""
    scaled = logits / sb.temperatures[:, None]
    if not sb.need_filter:
        return scaled.softmax(-1)
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(sb.top_ks > 0, sb.top_ks.clamp(max=vocab), vocab)
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass *before* it
    # is below top_p (so the most likely token always stays).
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(before >= sb.top_ps[:, None], 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """``logits``: [B, V] (any float dtype) -> next token ids [B] int64 (on the same device)."""
    logits = logits.float()
    greedy_ids = logits.argmax(-1)
    if sb.all_greedy:
        return greedy_ids
    probs = filtered_probs(logits, sb)
    cdf = probs.cumsum(-1)  # [B, V]
    # Inverse CDF: the first token whose cumulative mass reaches u (scaled by the total, which
    # rounding leaves a hair off 1). u > 0, so a zero-probability token is never the first.
    target = row_uniform(sb.seeds, sb.steps) * cdf[:, -1]
    sampled = torch.searchsorted(cdf, target[:, None]).squeeze(1)
    sampled = sampled.clamp_(max=logits.shape[-1] - 1)
    return torch.where(sb.greedy, greedy_ids, sampled)
