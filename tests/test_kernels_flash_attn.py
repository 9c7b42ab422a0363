"""Tests for slipstream.kernels.flash_attn_varlen.

Without CUDA the kernel runs in the Triton interpreter on CPU (fp32/fp16, tiny shapes). Tests
marked ``gpu`` run the compiled kernel in bf16/fp16 on CUDA and are skipped elsewhere.
"""

from __future__ import annotations

import os

import torch

# The interpreter must be selected before Triton decorates the kernel, so set it before
# importing slipstream.kernels (which also decorates lazily, at first launch, as a second guard).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib  # noqa: E402
import operator  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import slipstream.kernels as sk  # noqa: E402
from slipstream.kernels import flash_attn as fa  # noqa: E402
from slipstream.kernels import flash_attn_varlen, triton_available  # noqa: E402
from tests.attention_ref import cu_from_lens, reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Kernel variants (SLIPSTREAM_FLASH_VARIANT): `base` gets the full sweep, every other variant a
# reduced one (causal/full, GQA 1/2/4/8, lengths incl. 1 and odd, strided out, block shapes).
# Under the interpreter `sm90_ws` always falls back to a Triton kernel already in the list, so
# it is swept on GPUs only (tests/test_flash_sm90.py covers its fallback on CPU).
VARIANTS = [v for v in fa.VARIANTS if not (INTERPRET and v == "sm90_ws")]
NEW_VARIANTS = [v for v in VARIANTS if v != "base"]

# CPU tests launch the kernel through the Triton interpreter.
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and triton_available()),
    reason="needs Triton with TRITON_INTERPRET=1 (set automatically when CUDA is absent)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available() and not INTERPRET),
    reason="needs CUDA and compiled Triton",
)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def make_qkv(
    lens_q: list[int],
    lens_k: list[int],
    hq: int,
    hkv: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    fused: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T_q, hq, d], k/v [T_k, hkv, d]; with fused=True they are strided column slices of one
    fused projection buffer (row stride (hq + 2*hkv) * d), as a QKV GEMM would produce."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t_q, t_k = sum(lens_q), sum(lens_k)
    if fused:
        assert t_q == t_k, "fused qkv needs the same token count"
        qkv = torch.randn(t_q, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=dtype)
        q = qkv[:, : hq * d].view(t_q, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t_q, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t_q, hkv, d)
        assert not q.is_contiguous() and q.stride(0) == (hq + 2 * hkv) * d
        return q, k, v
    q = torch.randn(t_q, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t_k, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(t_k, hkv, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def make_out_view(
    t: int, hq: int, d: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled [t+4, hq+1, d] buffer and `out = big[2:2+t, :hq]` (strided view)."""
    big = torch.full((t + 4, hq + 1, d), float("nan"), dtype=dtype, device=device)
    return big, big[2 : 2 + t, :hq]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_untouched_outside(big: torch.Tensor, before: torch.Tensor, t: int, hq: int) -> None:
    """Every element of `big` outside big[2:2+t, :hq] is bit-identical to `before`."""
    outside = torch.ones(big.shape[:2], dtype=torch.bool, device=big.device)
    outside[2 : 2 + t, :hq] = False
    assert torch.equal(_bits(big)[outside], _bits(before)[outside]), "wrote outside `out`"


@contextlib.contextmanager
def variant_env(variant: str | None) -> Iterator[None]:
    """Set SLIPSTREAM_FLASH_VARIANT for the duration (None: leave the environment alone)."""
    if variant is None:
        yield
        return
    old = os.environ.get("SLIPSTREAM_FLASH_VARIANT")
    os.environ["SLIPSTREAM_FLASH_VARIANT"] = variant
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLIPSTREAM_FLASH_VARIANT", None)
        else:
            os.environ["SLIPSTREAM_FLASH_VARIANT"] = old


def run_and_check(
    lens_q: list[int],
    lens_k: list[int] | None,
    hq: int,
    hkv: int,
    d: int,
    causal: bool,
    *,
    fused: bool = False,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-4,
    config: tuple[int, int] | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """Run the kernel into a NaN-poisoned strided `out` view and compare with `reference`.

    `variant` goes through SLIPSTREAM_FLASH_VARIANT (the production path) for wrapper calls."""
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v = make_qkv(lens_q, lens_k, hq, hkv, d, dtype=dtype, fused=fused)
    cu_q, cu_k = cu_from_lens(lens_q), cu_from_lens(lens_k)
    t = q.shape[0]
    big, out = make_out_view(t, hq, d, dtype)
    before = big.clone()
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    if config is None:
        with variant_env(variant):
            flash_attn_varlen(
                q, k, v, out, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale
            )
    else:
        fa._launch(
            q, k, v, out, cu_q, cu_k, max_q, max_k, causal, scale, config=config, variant=variant
        )
    ref = reference(q, k, v, cu_q, cu_k, causal, scale)
    assert not torch.isnan(out).any(), "some rows of `out` were not written"
    err = (out.double() - ref).abs().max().item() if t else 0.0
    assert err <= atol, f"max abs err {err:.3g} > {atol}"
    assert_untouched_outside(big, before, t, hq)
    return out


# ----------------------------------------------------------------------------------------
# Correctness in the interpreter (CPU)
# ----------------------------------------------------------------------------------------

CASES = {
    # name: (lens, hq, hkv, d, fused)
    "mha-d64-one-odd-seq": ([37], 2, 2, 64, False),
    "gqa2-d128-fused": ([1, 17, 30], 4, 2, 128, True),
    "gqa4-d64": ([5, 1, 40, 3], 4, 1, 64, False),
    "one-long-many-short-fused": ([48, 1, 2, 0, 3, 1, 5, 7, 1, 4], 2, 1, 64, True),
}


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case: str, causal: bool, variant: str) -> None:
    lens, hq, hkv, d, fused = CASES[case]
    run_and_check(lens, None, hq, hkv, d, causal, fused=fused, variant=variant)


# Extra GQA ratios for the new variants (gqa_pack stacks min(G, 4) heads when G is a power of
# two: G=8 -> 4 heads per program, 2 programs per kv head; G=3 -> no stacking).
VARIANT_GQA_CASES = {
    # name: (lens, hq, hkv, d, fused)
    "gqa8-d32-fused": ([3, 1, 29, 16], 8, 1, 32, True),
    "gqa3-d64": ([1, 19, 2], 6, 2, 64, False),
    "gqa2-d256-one-token": ([1], 4, 2, 256, False),
}


@needs_interpreter
@pytest.mark.parametrize("variant", NEW_VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(VARIANT_GQA_CASES), ids=list(VARIANT_GQA_CASES))
def test_variants_more_gqa_ratios(case: str, causal: bool, variant: str) -> None:
    lens, hq, hkv, d, fused = VARIANT_GQA_CASES[case]
    run_and_check(lens, None, hq, hkv, d, causal, fused=fused, variant=variant)


@needs_interpreter
def test_variant_env_is_read_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every variant gives the same result (to fp32 rounding) through the env var, and an
    # unknown name is refused clearly rather than silently falling back.
    lens = [3, 18]
    q, k, v = make_qkv(lens, lens, 4, 2, 64)
    cu = cu_from_lens(lens)
    outs = {}
    for variant in VARIANTS:
        monkeypatch.setenv("SLIPSTREAM_FLASH_VARIANT", variant)
        outs[variant] = torch.empty_like(q)
        flash_attn_varlen(q, k, v, outs[variant], cu, cu, 18, 18)
    for variant in NEW_VARIANTS:
        assert (outs[variant] - outs["base"]).abs().max().item() <= 1e-5, variant
    monkeypatch.setenv("SLIPSTREAM_FLASH_VARIANT", "no_such_variant")
    with pytest.raises(ValueError, match="unknown variant"):
        flash_attn_varlen(q, k, v, torch.empty_like(q), cu, cu, 18, 18)
    monkeypatch.delenv("SLIPSTREAM_FLASH_VARIANT")
    assert fa._resolve_variant(None) == fa._DEFAULT_VARIANT == "sm90_ws"
    assert fa._resolve_variant("wide") == "wide"
    # Where sm90_ws cannot run: base for one causal sequence (faster there on the H100 A/B),
    # gqa_pack otherwise.
    assert fa._fallback_variant(num_seqs=1, causal=True) == "base"
    assert fa._fallback_variant(num_seqs=1, causal=False) == "gqa_pack"
    assert fa._fallback_variant(num_seqs=5, causal=True) == "gqa_pack"


def test_variant_config_lists_are_valid() -> None:
    for variant in VARIANTS:
        for d in fa.SUPPORTED_HEAD_DIMS:
            cfgs = fa._variant_configs(variant, d)
            assert cfgs and len(set(cfgs)) == len(cfgs), (variant, d)
            for bm, bn, w, st in cfgs:
                assert bm % fa._PACK_MAX == 0 and bn >= 16 and w in (4, 8, 16) and st >= 1
    assert fa._variant_configs("base", 128) == fa._CONFIGS_BY_HEAD_DIM[128]
    assert [fa._pack_for(g, 128) for g in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 1, 4, 2, 4, 4]
    assert fa._pack_for(4, 2) == 2


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fewer_queries_than_keys_bottom_right(causal: bool, variant: str) -> None:
    # Prefill over a cached prefix / decode: query i sees keys j <= i + Lk - Lq.
    lens_q, lens_k = [1, 5, 16, 3], [9, 20, 33, 3]
    out = run_and_check(lens_q, lens_k, 4, 2, 64, causal, variant=variant)
    if causal:
        # A single query (decode step) attends to every key: same as bidirectional.
        q, k, v = make_qkv(lens_q, lens_k, 4, 2, 64)
        full = reference(q, k, v, cu_from_lens(lens_q), cu_from_lens(lens_k), causal=False)
        assert (out[0].double() - full[0]).abs().max().item() <= 1e-4


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_without_visible_keys_are_zero(variant: str) -> None:
    # Lk < Lq with causal: the first Lq - Lk rows see nothing; Lk == 0: no row sees anything.
    lens_q, lens_k = [6, 3], [2, 0]
    q, k, v = make_qkv(lens_q, lens_k, 2, 1, 64)
    out = torch.full_like(q, float("nan"))
    with variant_env(variant):
        flash_attn_varlen(q, k, v, out, cu_from_lens(lens_q), cu_from_lens(lens_k), 6, 2)
    assert torch.equal(out[0:4], torch.zeros_like(out[0:4]))
    assert torch.equal(out[6:9], torch.zeros_like(out[6:9]))
    ref = reference(q, k, v, cu_from_lens(lens_q), cu_from_lens(lens_k), causal=True)
    assert (out.double() - ref).abs().max().item() <= 1e-4


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("config", [(32, 16), (16, 32), (64, 16)], ids=str)
def test_block_shapes(config: tuple[int, int], causal: bool, variant: str) -> None:
    # BLOCK_M != BLOCK_N: the diagonal spans several key blocks, or a key block spans several
    # query blocks; misaligned prefix lengths (Lk - Lq not a multiple of BLOCK_N). For
    # gqa_pack BLOCK_M counts stacked rows: (32, 16) is 16 positions x 2 heads.
    run_and_check([1, 5, 33, 3], [1, 40, 50, 3], 4, 2, 64, causal, config=config, variant=variant)


@needs_interpreter
def test_custom_softmax_scale() -> None:
    run_and_check([7, 20], None, 2, 1, 64, True, scale=0.3)
    run_and_check([7, 20], None, 2, 1, 64, False, scale=0.3)


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_in_interpreter(variant: str) -> None:
    run_and_check([3, 21], None, 4, 2, 64, True, dtype=torch.float16, atol=4e-3, variant=variant)


@needs_interpreter
def test_out_shares_fused_buffer_with_qkv() -> None:
    # One row-major buffer [T, (Hq + 2*Hkv + Hq) * D] holding q | k | v | out column slices:
    # their byte spans intersect but no element is shared, so this must be accepted, and the
    # q/k/v columns must be left intact.
    lens, hq, hkv, d = [9, 14], 2, 1, 64
    t = sum(lens)
    buf = torch.randn(t, (2 * hq + 2 * hkv) * d)
    buf[:, (hq + 2 * hkv) * d :] = float("nan")
    before = buf.clone()
    q = buf[:, : hq * d].view(t, hq, d)
    k = buf[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = buf[:, (hq + hkv) * d : (hq + 2 * hkv) * d].view(t, hkv, d)
    out = buf[:, (hq + 2 * hkv) * d :].view(t, hq, d)
    cu = cu_from_lens(lens)
    flash_attn_varlen(q, k, v, out, cu, cu, max(lens), max(lens))
    assert torch.equal(buf[:, : (hq + 2 * hkv) * d], before[:, : (hq + 2 * hkv) * d])
    ref = reference(q, k, v, cu, cu, causal=True)
    assert (out.double() - ref).abs().max().item() <= 1e-4


@needs_interpreter
def test_op_call_matches_wrapper_and_writes_in_place() -> None:
    lens = [5, 12]
    q, k, v = make_qkv(lens, lens, 2, 1, 64)
    cu = cu_from_lens(lens)
    out1 = torch.empty_like(q)
    out2 = torch.empty_like(q)
    ptr1, version1 = out1.data_ptr(), out1._version
    ptr2, version2 = out2.data_ptr(), out2._version
    # Eager wrapper (direct launch) and the registered op (dispatcher) do the same thing.
    assert flash_attn_varlen(q, k, v, out1, cu, cu, 12, 12) is None
    res = torch.ops.slipstream.flash_attn_varlen(q, k, v, out2, cu, cu, 12, 12, True, None)
    assert res is None
    # Mutated in place (same storage), and the version counter says so on both paths.
    assert out1.data_ptr() == ptr1 and out1._version > version1
    assert out2.data_ptr() == ptr2 and out2._version > version2
    assert torch.equal(out1, out2)
    with torch.inference_mode():
        out3 = torch.empty_like(q)
        flash_attn_varlen(q, k, v, out3, cu, cu, 12, 12)
    assert torch.equal(out1, out3)


@needs_interpreter
def test_profiler_sees_the_op_region() -> None:
    # Under the profiler the wrapper dispatches through the op, so traces (and the copy
    # attribution in slipstream.bench.profile_copies) see a named slipstream::flash_attn_varlen.
    lens = [4, 6]
    q, k, v = make_qkv(lens, lens, 2, 1, 64)
    cu = cu_from_lens(lens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        flash_attn_varlen(q, k, v, torch.empty_like(q), cu, cu, 6, 6)
    assert "slipstream::flash_attn_varlen" in {e.name for e in prof.events()}


@needs_interpreter
def test_vmap_does_not_launch_on_wrapped_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a functorch transform the tensors are plain-typed wrappers: the wrapper must go
    # through the op (which has no batching rule, so vmap refuses it) instead of launching
    # the kernel on the wrappers.
    launched: list[int] = []
    monkeypatch.setattr(fa, "_launch", lambda *a, **k: launched.append(1))
    lens = [4, 6]
    q, k, v = make_qkv(lens, lens, 2, 1, 64)
    cu = cu_from_lens(lens)

    def one(qq: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(qq)
        flash_attn_varlen(qq, k, v, out, cu, cu, 6, 6)
        return out

    with pytest.raises(RuntimeError):
        torch.vmap(one)(torch.stack([q, q]))
    assert launched == []
    one(q)  # plain eager: the direct launch
    assert launched == [1]


@needs_interpreter
def test_empty_inputs_are_a_no_op() -> None:
    q = torch.empty(0, 2, 64)
    k = torch.empty(0, 1, 64)
    out = torch.empty(0, 2, 64)
    flash_attn_varlen(q, k, k, out, cu_from_lens([]), cu_from_lens([]), 0, 0)
    flash_attn_varlen(q, k, k, out, cu_from_lens([0, 0]), cu_from_lens([0, 0]), 0, 0)


# ----------------------------------------------------------------------------------------
# Argument checking (no kernel launch needed)
# ----------------------------------------------------------------------------------------


def _good_args() -> dict:
    lens = [3, 5]
    q, k, v = make_qkv(lens, lens, 4, 2, 64)
    return dict(
        q=q,
        k=k,
        v=v,
        out=torch.empty_like(q),
        cu_seqlens_q=cu_from_lens(lens),
        cu_seqlens_k=cu_from_lens(lens),
        max_seqlen_q=5,
        max_seqlen_k=5,
    )


def _bad(**changes) -> dict:
    args = _good_args()
    for key, fn in changes.items():
        args[key] = fn(args)
    return args


def _overlapping_k_and_out() -> dict:
    # k and out are views of one flat buffer whose spans share 64 elements.
    flat = torch.randn(8 * 2 * 64 + 8 * 4 * 64 - 64)
    return dict(
        k=lambda a: flat[: 8 * 2 * 64].view(8, 2, 64),
        out=lambda a: flat[8 * 2 * 64 - 64 :].view(8, 4, 64),
    )


BAD_CALLS = {
    "hq-not-multiple-of-hkv": (
        _bad(q=lambda a: torch.randn(8, 3, 64), out=lambda a: torch.empty(8, 3, 64)),
        ValueError,
        r"multiple of kv heads",
    ),
    "mixed-dtypes": (_bad(k=lambda a: a["k"].half()), TypeError, r"`k` dtype"),
    "out-dtype": (_bad(out=lambda a: a["out"].half()), TypeError, r"`out` dtype"),
    "cu-seqlens-int64": (
        _bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()),
        TypeError,
        r"`cu_seqlens_q` must be int32",
    ),
    "cu-seqlens-2d": (
        _bad(cu_seqlens_k=lambda a: a["cu_seqlens_k"][None]),
        ValueError,
        r"`cu_seqlens_k` must be 1-D",
    ),
    "cu-seqlens-lengths-differ": (
        _bad(cu_seqlens_k=lambda a: cu_from_lens([3, 4, 1])),
        ValueError,
        r"same length",
    ),
    "token-count-mismatch": (
        _bad(cu_seqlens_q=lambda a: cu_from_lens([3, 4])),
        ValueError,
        r"cu_seqlens_q\[-1\]",
    ),
    "too-few-keys": (
        _bad(cu_seqlens_k=lambda a: cu_from_lens([3, 6])),
        ValueError,
        r"cu_seqlens_k\[-1\]",
    ),
    "max-seqlen-too-small": (_bad(max_seqlen_q=lambda a: 4), ValueError, r"max_seqlen_q"),
    "out-shape": (_bad(out=lambda a: torch.empty(8, 4, 32)), ValueError, r"head_dim of `out`"),
    "out-heads": (_bad(out=lambda a: torch.empty(8, 2, 64)), ValueError, r"`out` shape"),
    "head-dim-48": (
        _bad(
            q=lambda a: torch.randn(8, 4, 48),
            k=lambda a: torch.randn(8, 2, 48),
            v=lambda a: torch.randn(8, 2, 48),
            out=lambda a: torch.empty(8, 4, 48),
        ),
        ValueError,
        r"unsupported head_dim 48",
    ),
    "q-2d": (_bad(q=lambda a: a["q"].flatten(1)), ValueError, r"`q` must be 3-D"),
    "last-dim-strided": (
        _bad(v=lambda a: torch.randn(8, 2, 128)[:, :, ::2]),
        ValueError,
        r"last dim of `v` must have stride 1",
    ),
    "out-overlaps-q": (_bad(out=lambda a: a["q"]), ValueError, r"`out` overlaps .*`q`"),
    "out-overlaps-k": (_bad(**_overlapping_k_and_out()), ValueError, r"`out` overlaps .*`k`"),
    "bf16-on-cpu": (
        _bad(**{n: (lambda a, n=n: a[n].bfloat16()) for n in ("q", "k", "v", "out")}),
        TypeError,
        r"not supported on cpu",
    ),
    "cu-seqlens-other-device": (
        _bad(cu_seqlens_k=lambda a: a["cu_seqlens_k"].to("meta")),
        ValueError,
        r"one device.*`cu_seqlens_k`",
    ),
    "scale-negative": (
        dict(_good_args(), softmax_scale=-1.0),
        ValueError,
        r"softmax_scale",
    ),
    "max-seqlen-tensor": (
        _bad(max_seqlen_k=lambda a: torch.tensor(5)),
        TypeError,
        r"max_seqlen_k",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_calls_raise_clear_errors(name: str) -> None:
    args, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        flash_attn_varlen(**args)


@pytest.mark.parametrize("name", ["hq-not-multiple-of-hkv", "mixed-dtypes", "token-count-mismatch"])
def test_bad_calls_raise_through_the_op_too(name: str) -> None:
    args, exc, pattern = BAD_CALLS[name]
    a = dict(args)
    with pytest.raises(exc, match=pattern):
        torch.ops.slipstream.flash_attn_varlen(
            a["q"], a["k"], a["v"], a["out"], a["cu_seqlens_q"], a["cu_seqlens_k"],
            a["max_seqlen_q"], a["max_seqlen_k"], True, None,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Op registration and graph capture
# ----------------------------------------------------------------------------------------


def test_op_schema_mutates_out_and_returns_nothing() -> None:
    schema = str(torch.ops.slipstream.flash_attn_varlen.default._schema)
    assert "Tensor(a!) out" in schema
    assert schema.endswith("-> ()")
    # Only `out` is written.
    assert schema.count("!") == 1


def test_package_exports() -> None:
    assert sk.flash_attn_varlen is flash_attn_varlen
    assert isinstance(sk.triton_available(), bool)
    if INTERPRET:
        assert sk.triton_available()


def test_reimport_is_idempotent() -> None:
    lib_before = fa._LIB
    mod = importlib.reload(fa)
    assert mod._LIB is lib_before  # no second registration, and the old one stays alive
    assert "Tensor(a!) out" in str(torch.ops.slipstream.flash_attn_varlen.default._schema)
    if INTERPRET and triton_available():
        run_and_check([4, 9], None, 2, 1, 64, True)


def test_import_without_triton_registers_op_and_fails_clearly() -> None:
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, slipstream.kernels as sk\n"
        "assert not sk.triton_available()\n"
        "assert 'Tensor(a!) out' in str(torch.ops.slipstream.flash_attn_varlen.default._schema)\n"
        "q = torch.randn(4, 2, 64); cu = torch.tensor([0, 4], dtype=torch.int32)\n"
        "try:\n"
        "    sk.flash_attn_varlen(q, q, q, torch.empty_like(q), cu, cu, 4, 4)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "print('OK')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


_COPY_TARGETS = {
    torch.ops.aten.copy_.default,
    torch.ops.aten.copy.default,
    torch.ops.aten.clone.default,
}


def _attn_alloc_inside(q, k, v, cu):
    # The engine pattern: allocate the output, let the kernel fill it, return it.
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.slipstream.flash_attn_varlen(q, k, v, out, cu, cu, 8, 8, True, None)
    return out


def _small_inputs() -> tuple[torch.Tensor, ...]:
    q, k, v = make_qkv([3, 5], [3, 5], 2, 1, 64)
    return q, k, v, cu_from_lens([3, 5])


def test_make_fx_graph_uses_the_buffer_without_copies() -> None:
    # Fake-tensor trace (runs only the fake impl): the op must appear as one node that takes
    # the `empty` buffer as `out`, and that same buffer is the graph output.
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(_attn_alloc_inside, tracing_mode="fake")(*_small_inputs())
    nodes = list(gm.graph.nodes)
    assert not [n for n in nodes if n.target in _COPY_TARGETS]
    (attn,) = [n for n in nodes if n.target is torch.ops.slipstream.flash_attn_varlen.default]
    (empty,) = [n for n in nodes if n.target is torch.ops.aten.empty.memory_format]
    assert attn.args[3] is empty
    (output,) = [n for n in nodes if n.op == "output"]
    assert output.args[0] is empty


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_wrapper_is_recorded_as_the_op_when_traced(mode: str) -> None:
    # The Python wrapper launches directly in plain eager mode; under tracing (here make_fx's
    # dispatch mode) it must go through the op so the mutation is recorded.
    if mode == "real" and not (INTERPRET and triton_available()):
        pytest.skip("real-mode tracing runs the kernel: needs the interpreter")
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(q, k, v, cu):
        out = torch.empty_like(q)
        flash_attn_varlen(q, k, v, out, cu, cu, 8, 8)
        return out

    gm = make_fx(fn, tracing_mode=mode)(*_small_inputs())
    nodes = list(gm.graph.nodes)
    (attn,) = [n for n in nodes if n.target is torch.ops.slipstream.flash_attn_varlen.default]
    (output,) = [n for n in nodes if n.op == "output"]
    assert output.args[0] is attn.args[3]
    assert not [n for n in nodes if n.target in _COPY_TARGETS]


@needs_interpreter
def test_aot_graph_functionalizes_onto_the_buffer_without_copies() -> None:
    # torch.compile + AOTAutograd (custom backend that records the post-functionalization
    # forward graph). The mutation becomes auto_functionalized(_v2) whose base is the `empty`
    # buffer; no aten.copy_/copy/clone node appears and the output is that node's result.
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(
        _attn_alloc_inside, backend=aot_autograd(fw_compiler=record), fullgraph=True
    )
    inputs = _small_inputs()
    with torch.no_grad():
        got = compiled(*inputs)
    torch.testing.assert_close(got, _attn_alloc_inside(*inputs), rtol=0, atol=0)

    (gm,) = graphs
    nodes = list(gm.graph.nodes)
    assert not [n for n in nodes if n.target in _COPY_TARGETS], gm.code
    hops = {
        getattr(torch.ops.higher_order, name)
        for name in ("auto_functionalized", "auto_functionalized_v2")
        if hasattr(torch.ops.higher_order, name)
    }
    func = [n for n in nodes if n.target in hops]
    direct = [n for n in nodes if n.target is torch.ops.slipstream.flash_attn_varlen.default]
    assert len(func) + len(direct) == 1, gm.code
    (empty,) = [n for n in nodes if n.target is torch.ops.aten.empty.memory_format]
    (output,) = [n for n in nodes if n.op == "output"]
    (result,) = output.args[0]
    if func:
        # v2: kwargs `_all_bases=[empty]`; v1: kwargs `out=empty`. The graph returns the
        # HOP's result for that buffer (Inductor then reinplaces it: see the next test).
        kw = func[0].kwargs
        assert kw.get("_all_bases", [kw.get("out")])[0] is empty, gm.code
        assert result.target is operator.getitem and result.args[0] is func[0], gm.code
    else:
        assert direct[0].args[3] is empty and result is empty, gm.code


def _call_body(code: str) -> str:
    start = code.index("def call(")
    end = code.find("\nrunner = ", start)
    end = code.find("\ndef ", start + 10) if end < 0 else end
    return code[start:end]


def _attn_into_input(q, k, v, cu, out):
    torch.ops.slipstream.flash_attn_varlen(q, k, v, out, cu, cu, 8, 8, True, None)


def _attn_into_view_of_input(q, k, v, cu, big):
    torch.ops.slipstream.flash_attn_varlen(q, k, v, big[2:10, :2], cu, cu, 8, 8, True, None)


def _wrapper_alloc_inside(q, k, v, cu):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    flash_attn_varlen(q, k, v, out, cu, cu, 8, 8)
    return out


@needs_interpreter
@pytest.mark.parametrize(
    "pattern", ["alloc-inside", "wrapper-alloc-inside", "out-is-input", "out-is-view-of-input"]
)
def test_inductor_calls_kernel_in_place(pattern: str) -> None:
    # Strongest check: the final code Inductor generates (after its reinplacing pass and the
    # decomposition of auto_functionalized) calls the op directly on the buffer, with no
    # clone/copy anywhere in the compiled `call` function.
    from torch._inductor.utils import run_and_get_code

    q, k, v, cu = _small_inputs()
    if pattern == "alloc-inside":
        fn, extra = _attn_alloc_inside, ()
    elif pattern == "wrapper-alloc-inside":
        fn, extra = _wrapper_alloc_inside, ()
    elif pattern == "out-is-input":
        fn, extra = _attn_into_input, (torch.full_like(q, float("nan")),)
    else:
        fn, extra = _attn_into_view_of_input, (torch.full((12, 3, 64), float("nan")),)
    torch._dynamo.reset()
    with torch.no_grad():
        got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), q, k, v, cu, *extra)
    body = _call_body(codes[0])
    assert body.count("torch.ops.slipstream.flash_attn_varlen.default(") == 1, body
    for bad in ("clone", "copy_", "aten.copy", ".copy("):
        assert bad not in body, f"{bad!r} in compiled code:\n{body}"

    expected_extra = tuple(e.clone() for e in extra)
    expected = fn(q, k, v, cu, *expected_extra)
    if not extra:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        call = body[body.index("torch.ops.slipstream.flash_attn_varlen.default(") :]
        out_arg = call.split("(", 1)[1].split(",")[3].strip()
        assert f"return ({out_arg}, )" in body, body  # the buffer the kernel wrote is returned
    else:
        torch.testing.assert_close(extra[0], expected_extra[0], rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------
# GPU (compiled Triton, bf16/fp16)
# ----------------------------------------------------------------------------------------


def _mixed_lengths(n: int, seed: int, max_len: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(1, max_len + 1, (n,), generator=g)]


# Autotuned (the production path). Each new (dtype, head_dim, causal) compiles every config of
# the head_dim's list once, so this list is kept short; other shapes use a fixed config below.
GPU_AUTOTUNED = {
    # name: (lens_q, lens_k, hq, hkv, d, causal, fused, dtype)
    "7168-causal-gqa16/8-d128-bf16": ([7168], None, 16, 8, 128, True, False, torch.bfloat16),
    "7168-causal-gqa16/8-d128-fp16": ([7168], None, 16, 8, 128, True, False, torch.float16),
    "7168-full-gqa16/8-d128-bf16": ([7168], None, 16, 8, 128, False, True, torch.bfloat16),
    "mixed-causal-d128-bf16": (
        [1, 7, 2048, 33, 1, 513, 128, 3000, 64, 5, 1024, 17],
        None, 16, 8, 128, True, True, torch.bfloat16,
    ),
    "prefix-causal-d128-bf16": (
        [1, 100, 1000, 7], [500, 100, 3000, 64], 16, 8, 128, True, False, torch.bfloat16,
    ),
}  # fmt: skip

# SLIPSTREAM_FLASH_AUTOTUNE=0: the first config of each head_dim's list (one compile each).
GPU_FIXED = {
    "7168-causal-gqa16/8-d64-bf16": ([7168], None, 16, 8, 64, True, False, torch.bfloat16),
    "mixed-full-gqa4-d64-fused-fp16": (
        _mixed_lengths(20, 1, 700), None, 8, 2, 64, False, True, torch.float16,
    ),
    "d256-causal-bf16": ([300, 77], None, 4, 4, 256, True, False, torch.bfloat16),
    "d32-full-bf16": ([129, 1, 64], None, 12, 12, 32, False, True, torch.bfloat16),
}  # fmt: skip


def _gpu_check_case(
    spec: tuple,
    config: tuple[int, ...] | None = None,
    device: str = "cuda",
    variant: str | None = None,
) -> None:
    lens_q, lens_k, hq, hkv, d, causal, fused, dtype = spec
    lens_k = lens_q if lens_k is None else lens_k
    dev = torch.device(device)
    q, k, v = make_qkv(lens_q, lens_k, hq, hkv, d, dtype=dtype, device=dev, fused=fused)
    cu_q, cu_k = cu_from_lens(lens_q, dev), cu_from_lens(lens_k, dev)
    t = q.shape[0]
    big, out = make_out_view(t, hq, d, dtype, dev)
    before = big.clone()
    max_q, max_k = max(lens_q), max(lens_k)
    if config is None:
        with variant_env(variant):
            flash_attn_varlen(q, k, v, out, cu_q, cu_k, max_q, max_k, causal=causal)
    else:
        fa._launch(
            q, k, v, out, cu_q, cu_k, max_q, max_k, causal, None, config=config, variant=variant
        )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ref = reference(q, k, v, cu_q, cu_k, causal, acc_dtype=torch.float32, head_chunk=4)
    assert not torch.isnan(out).any(), "rows of `out` not written"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"relative error {rel:.3g} (variant {variant}, config {config})"
    assert_untouched_outside(big, before, t, hq)


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(GPU_AUTOTUNED), ids=list(GPU_AUTOTUNED))
def test_gpu_matches_reference_autotuned(case: str, variant: str) -> None:
    _gpu_check_case(GPU_AUTOTUNED[case], variant=variant)


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(GPU_FIXED), ids=list(GPU_FIXED))
def test_gpu_matches_reference_fixed_config(
    case: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIPSTREAM_FLASH_AUTOTUNE", "0")
    _gpu_check_case(GPU_FIXED[case], variant=variant)


_D128_VARIANT_CONFIGS = [
    (variant, cfg) for variant in VARIANTS for cfg in fa._variant_configs(variant, 128)
]


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("variant", "config"), _D128_VARIANT_CONFIGS, ids=[f"{v}-{c}" for v, c in _D128_VARIANT_CONFIGS]
)
def test_gpu_every_d128_config(variant: str, config: tuple[int, int, int, int]) -> None:
    # Whatever the autotuner picks must be correct: run each candidate of each variant
    # explicitly (these compiles are shared with the autotuned bf16 causal D=128 test above).
    spec = ([1, 77, 700, 129, 64], [1, 300, 700, 200, 64], 16, 8, 128, True, False, torch.bfloat16)
    _gpu_check_case(spec, config=config, variant=variant)


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_gpu_variants_gqa4_and_mha_d128(variant: str) -> None:
    # gqa_pack with PACK=4 (G=4) and PACK=1 (MHA), fused strided q/k/v, bidirectional + causal.
    for spec in (
        (_mixed_lengths(9, 3, 900), None, 16, 4, 128, True, True, torch.bfloat16),
        ([1, 333, 1024], None, 8, 8, 128, False, False, torch.bfloat16),
    ):
        _gpu_check_case(spec, variant=variant)


@gpu
@needs_cuda
def test_gpu_debug_check_catches_bad_cu_seqlens() -> None:
    dev = torch.device("cuda")
    q, k, v = make_qkv([4, 4], [4, 4], 2, 1, 64, dtype=torch.bfloat16, device=dev)
    bad = cu_from_lens([4, 3], dev)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]"):
        flash_attn_varlen(q, k, v, torch.empty_like(q), bad, bad, 4, 4, check=True)
