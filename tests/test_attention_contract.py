"""The attention-output contract: backends fill the buffer they are handed."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from slipstream.attention import AttentionBackend, AttentionMetadata, get_backend_class
from slipstream.layers.attention import Attention, AttentionOutputError


class LazyBackend(AttentionBackend):
    """Writes only the first sequence: the debug check must catch it."""

    name: ClassVar[str] = "lazy"
    writes_in_place: ClassVar[bool] = True

    def forward(self, q, k, v, out, meta):  # type: ignore[no-untyped-def]
        n = meta.seq_lens_q[0]
        out[:n] = q[:n]


def _qkv(t: int, hq: int = 4, hkv: int = 2, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(t, hq, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
    )


def test_debug_check_catches_unwritten_rows() -> None:
    q, k, v = _qkv(7)
    meta = AttentionMetadata.from_seq_lens([3, 4], causal=True, device="cpu")
    layer = Attention(LazyBackend(4, 2, 8, 8**-0.5), debug_checks=True)
    with pytest.raises(AttentionOutputError, match=r"left rows \[3, 4, 5, 6\]"):
        layer(q, k, v, meta)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_matches_per_sequence_reference(causal: bool) -> None:
    lens = [1, 5, 2, 9]
    q, k, v = _qkv(sum(lens))
    meta = AttentionMetadata.from_seq_lens(lens, causal=causal, device="cpu")
    backend = get_backend_class("torch")(4, 2, 8, 0.3)
    assert backend.writes_in_place is False
    layer = Attention(backend, debug_checks=True)
    out = layer(q, k, v, meta).view(-1, 4, 8)
    start = 0
    for n in lens:
        qs, ks, vs = (x[start : start + n].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vs)
        assert (out[start : start + n].double() - ref).abs().max() < 1e-5
        start += n
