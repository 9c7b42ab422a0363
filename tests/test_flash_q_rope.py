"""The flash kernel's q prologue: Qwen3's per-head q RMSNorm + NeoX rotary applied while the
query tiles load (``flash_attn_varlen(..., q_norm_weight=, cos=, sin=)``), and the k-only mode of
``qk_norm_rope_`` that goes with it.

Without CUDA the kernels run under the Triton interpreter (fp32 / fp16); ``gpu`` tests run the
compiled kernels in bf16 at Qwen3-0.6B's head layout.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from slipstream.kernels import flash_attn as fa  # noqa: E402
from slipstream.kernels import fused as F  # noqa: E402
from slipstream.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.attention_ref import cu_from_lens, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not fa.triton_available(), reason="needs Triton")
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(
    lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Raw qkv rows (a wider buffer's column slice), norm weights, cos/sin, cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    width = (hq + 2 * hkv) * d
    big = (torch.randn(t, width + 8, generator=g) * 2).to(device=DEV, dtype=dtype)
    qkv = big[:, :width]
    qw = (1.0 + 0.3 * torch.randn(d, generator=g)).to(device=DEV, dtype=dtype)
    kw = (1.0 + 0.3 * torch.randn(d, generator=g)).to(device=DEV, dtype=dtype)
    pos = torch.tensor([p for n in lens for p in range(n)], device=DEV)
    rot = RotaryEmbedding(d, 10000.0, 4096)
    cos, sin = rot.cos_sin(pos)
    ch, sh = rot.cos_sin_half(pos, dtype)
    assert torch.equal(ch, cos[:, : d // 2].to(dtype)) and torch.equal(
        cos[:, : d // 2], cos[:, d // 2 :]
    )
    return qkv, qw, kw, cos, sin, cu_from_lens(lens, DEV), ch, sh


def _views(qkv: torch.Tensor, hq: int, hkv: int, d: int) -> tuple[torch.Tensor, ...]:
    t = qkv.shape[0]
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    return q, k, v


LENS = [[1], [3, 1, 17], [40, 5, 1, 33]]
DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
CONFIG = (16, 16) if INTERPRET else (64, 64, 4, 2)


@needs_triton
@pytest.mark.parametrize("variant", ["base", "gqa_pack"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("causal", [True, False])
def test_prologue_equals_rotating_q_first(
    variant: str, dtype: torch.dtype, lens: list[int], causal: bool
) -> None:
    hq, hkv, d = 4, 2, 32
    qkv, qw, kw, cos, sin, cu, ch, sh = _case(lens, hq, hkv, d, dtype, seed=len(lens))
    raw = qkv.clone()
    t, mx = qkv.shape[0], max(lens)
    # Reference path: the fused qk kernel rotates q and k in place, then plain attention.
    ready = qkv.clone()
    F.qk_norm_rope_(ready, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    q_r, k_r, v_r = _views(ready, hq, hkv, d)
    want = torch.full((t, hq, d), float("nan"), dtype=dtype, device=DEV)
    fa._launch(q_r, k_r, v_r, want, cu, cu, mx, mx, causal, None, config=CONFIG, variant=variant)
    # Prologue path: q raw, k rotated.
    q_raw = _views(qkv, hq, hkv, d)[0]
    big_out = torch.full((t, hq + 1, d), float("nan"), dtype=dtype, device=DEV)
    out = big_out[:, :hq]  # a strided view: the spare head must stay untouched
    fa._launch(
        q_raw, k_r, v_r, out, cu, cu, mx, mx, causal, None, qw, ch, sh, 1e-6,
        config=CONFIG, variant=variant,
    )  # fmt: skip
    assert not torch.isnan(out).any(), "rows of `out` left unwritten"
    assert torch.isnan(big_out[:, hq]).all(), "the kernel wrote outside `out`"
    assert torch.equal(qkv, raw), "the prologue wrote q (or k/v)"
    # Same tile values into the same kernel config: the results are identical.
    assert torch.equal(out, want)
    ref = reference(q_r, k_r, v_r, cu, cu, causal, d**-0.5)
    assert (out.double() - ref).abs().max().item() <= TOL[dtype]


@needs_triton
def test_prologue_through_the_op_and_the_wrapper() -> None:
    dtype = DTYPES[0]
    hq, hkv, d, lens = 4, 2, 32, [3, 1, 17]
    qkv, qw, kw, cos, sin, cu, ch, sh = _case(lens, hq, hkv, d, dtype)
    q, k, v = _views(qkv, hq, hkv, d)
    outs = []
    for via_op in (False, True):
        out = torch.full((qkv.shape[0], hq, d), float("nan"), dtype=dtype, device=DEV)
        if via_op:
            torch.ops.slipstream.flash_attn_varlen(
                q, k, v, out, cu, cu, 17, 17, True, None, qw, ch, sh, 1e-6
            )
        else:
            fa.flash_attn_varlen(
                q, k, v, out, cu, cu, 17, 17, causal=True, q_norm_weight=qw, cos=ch, sin=sh,
                q_norm_eps=1e-6,
            )  # fmt: skip
        outs.append(out)
    assert not torch.isnan(outs[0]).any()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # ...and it is not the result without the prologue
    plain = torch.empty_like(outs[0])
    fa.flash_attn_varlen(q, k, v, plain, cu, cu, 17, 17, causal=True)
    assert not torch.equal(plain, outs[0])


@needs_triton
def test_prologue_bad_arguments_raise() -> None:
    dtype = DTYPES[0]
    hq, hkv, d, lens = 4, 2, 32, [3, 5]
    qkv, qw, kw, cos, sin, cu, ch, sh = _case(lens, hq, hkv, d, dtype)
    q, k, v = _views(qkv, hq, hkv, d)
    out = torch.empty(q.shape, dtype=dtype, device=DEV)

    def call(**kw_):  # type: ignore[no-untyped-def]
        args = {"q_norm_weight": qw, "cos": ch, "sin": sh, "q_norm_eps": 1e-6} | kw_
        fa.flash_attn_varlen(q, k, v, out, cu, cu, 5, 5, causal=True, **args)

    with pytest.raises(ValueError, match="go together"):
        call(sin=None)
    with pytest.raises(ValueError, match="`cos` must have shape"):
        call(cos=ch[:-1])
    with pytest.raises(ValueError, match="`sin` must have shape"):
        call(sin=sin)  # the full-width table
    with pytest.raises(ValueError, match="`q_norm_weight` must have shape"):
        call(q_norm_weight=qw[:-2])
    with pytest.raises(ValueError, match="q_norm_eps"):
        call(q_norm_eps=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        call(sin=sh.to(torch.int32))
    # `out` sharing memory with cos: the kernel would read what it overwrites
    shared = torch.empty(q.shape[0], hq * d + d // 2, dtype=dtype, device=DEV)
    with pytest.raises(ValueError, match="overlaps the memory of `cos`"):
        fa.flash_attn_varlen(
            q, k, v, shared[:, : hq * d].view(-1, hq, d), cu, cu, 5, 5, causal=True,
            q_norm_weight=qw, cos=shared[:, hq * d :], sin=sh,
        )  # fmt: skip


@needs_triton
@pytest.mark.parametrize("t", [1, 3, 17])
def test_qk_norm_rope_k_only(t: int) -> None:
    dtype = DTYPES[0]
    hq, hkv, d = 4, 2, 32
    qkv, qw, kw, cos, sin = _case([t], hq, hkv, d, dtype, seed=t)[:5]
    full = qkv.clone()
    F.qk_norm_rope_(full, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    before = qkv.clone()
    F.qk_norm_rope_(qkv[:, hq * d :], qw, kw, cos, sin, 0, hkv, d, 1e-6)
    assert torch.equal(qkv[:, : hq * d], before[:, : hq * d]), "q columns were written"
    assert torch.equal(qkv[:, hq * d :], full[:, hq * d :]), "k differs from the q+k run"
    with pytest.raises(ValueError, match="num_heads"):
        F.qk_norm_rope_(qkv[:, hq * d :], qw, kw, cos, sin, -1, hkv, d, 1e-6)


def _hidden(
    model_dir: Path, backend: str, fused: str, qrope: str, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    from slipstream import Engine
    from slipstream.attention import AttentionMetadata

    monkeypatch.setenv("SLIPSTREAM_FUSED", fused)
    monkeypatch.setenv("SLIPSTREAM_FLASH_QROPE", qrope)
    dtype = "float32" if INTERPRET else "bfloat16"
    engine = Engine(model_dir, device=DEV, dtype=dtype, attention_backend=backend)
    seqs = [[5, 17, 300, 2, 999, 41, 7], [1], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 3]]
    meta = AttentionMetadata.from_seq_lens([len(s) for s in seqs], causal=True, device=DEV)
    ids = torch.tensor([t for s in seqs for t in s], device=DEV)
    pos = torch.tensor([p for s in seqs for p in range(len(s))], device=DEV)
    with torch.inference_mode():
        full = engine.runner.model(ids, pos, meta).float()
        last = engine.runner.model(ids, pos, meta, last_token_only=True).float()
    return full, last


@needs_triton
def test_qwen3_uses_the_prologue_and_matches(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads_seen: list[int] = []
    prologue_calls: list[bool] = []
    real_qk, real_fa = F.qk_norm_rope_, fa.flash_attn_varlen

    def qk(*a, **k):  # type: ignore[no-untyped-def]
        heads_seen.append(a[5])
        return real_qk(*a, **k)

    def flash(*a, **k):  # type: ignore[no-untyped-def]
        prologue_calls.append(k.get("q_norm_weight") is not None)
        return real_fa(*a, **k)

    import slipstream.attention.flash_backend as fb

    monkeypatch.setattr(F, "qk_norm_rope_", qk)
    monkeypatch.setattr(fb, "flash_attn_varlen", flash)
    fused = "always" if INTERPRET else "auto"
    ref_full, ref_last = _hidden(tiny_qwen3, "torch", "0", "1", monkeypatch)
    off_full, off_last = _hidden(tiny_qwen3, "flash", fused, "0", monkeypatch)
    # SLIPSTREAM_FLASH_QROPE=0: q and k rotated together, attention on ready q (2 layers x 2
    # forwards)
    assert heads_seen == [4, 4, 4, 4] and prologue_calls == [False] * 4
    heads_seen.clear()
    prologue_calls.clear()
    got_full, got_last = _hidden(tiny_qwen3, "flash", fused, "1", monkeypatch)
    # Default: k alone in the qk kernel, q in the attention prologue, except in the last layer
    # of the last-token forward (only the pooled rows' queries: rotated beforehand).
    assert heads_seen == [0, 0, 0, 4]
    assert prologue_calls == [True, True, True, False]
    tol = 2e-4 if INTERPRET else 3e-2
    torch.testing.assert_close(got_full, ref_full, rtol=tol, atol=tol)
    torch.testing.assert_close(got_last, ref_last, rtol=tol, atol=tol)
    if INTERPRET:  # one fixed kernel config: the two paths feed it identical tiles
        assert torch.equal(got_full, off_full) and torch.equal(got_last, off_last)
    else:  # autotuning may pick another config with the prologue
        torch.testing.assert_close(got_full, off_full, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["base", "gqa_pack"])
def test_gpu_prologue_qwen3_heads_autotuned(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, 16 q / 8 kv heads of 128, the autotuned kernel, lengths 1..2000."""
    monkeypatch.setenv("SLIPSTREAM_FLASH_VARIANT", variant)
    hq, hkv, d, lens = 16, 8, 128, [1, 7, 129, 2000, 64]
    qkv, qw, kw, cos, sin, cu, ch, sh = _case(lens, hq, hkv, d, torch.bfloat16)
    ready = qkv.clone()
    F.qk_norm_rope_(ready, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    q_r, k_r, v_r = _views(ready, hq, hkv, d)
    want = torch.empty(q_r.shape, dtype=torch.bfloat16, device=DEV)
    fa.flash_attn_varlen(q_r, k_r, v_r, want, cu, cu, 2000, 2000, causal=True)
    got = torch.full(q_r.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    q_raw = _views(qkv, hq, hkv, d)[0]
    fa.flash_attn_varlen(
        q_raw, k_r, v_r, got, cu, cu, 2000, 2000, causal=True, q_norm_weight=qw, cos=ch,
        sin=sh, q_norm_eps=1e-6,
    )  # fmt: skip
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    ref = reference(q_r, k_r, v_r, cu, cu, True, d**-0.5)
    assert (got.double() - ref).abs().max().item() <= 3e-2
