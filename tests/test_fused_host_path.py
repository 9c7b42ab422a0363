"""The fused kernels' host fast path: cached argument plans and the direct (dispatcher-free)
eager call.

Checked here: eager calls skip ``torch.ops`` once a plan exists, while anything that traces or
profiles still sees the named op; both paths compute the same thing; a bad argument raises the
same error (before any launch) whether or not a good call with the same layout came first; and
results keep matching the torch references across cache hits, misses and evictions.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from slipstream.kernels import fused as F
from slipstream.kernels._library import eager_direct_ok  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEV == "cpu"
EPS = 1e-6

OPS = (
    "fused_rmsnorm",
    "fused_add_rmsnorm_",
    "qk_norm_rope_",
    "fused_silu_and_mul",
    "fp8_quant_per_token",
    "fused_rmsnorm_fp8",
    "fused_add_rmsnorm_fp8",
    "fused_silu_and_mul_fp8",
)


@pytest.fixture(autouse=True)
def _fresh_plans() -> Iterator[None]:
    F._plans.clear()
    yield
    F._plans.clear()


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts calls that go through ``torch.ops.slipstream.<op>`` (the dispatcher path)."""
    calls: Counter[str] = Counter()
    for name in OPS:
        real = getattr(torch.ops.slipstream, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        # torch resolves an op's Python OpOverload as torch.ops.<ns>.<name>.<overload>
        counted.default = real.default  # type: ignore[attr-defined]
        monkeypatch.setattr(torch.ops.slipstream, name, counted)
    return calls


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every kernel launch (op name), then launches it. The CUDA first-use self-check
    (which launches too) is off here; tests/test_kernels_fused.py covers it."""
    monkeypatch.setenv("SLIPSTREAM_FUSED_CHECK", "0")
    seen: list[str] = []
    real = F._launch

    def recording(op: str, *args: Any, **kwargs: Any) -> None:
        seen.append(op)
        real(op, *args, **kwargs)

    monkeypatch.setattr(F, "_launch", recording)
    return seen


# ----------------------------------------------------------------------------- cases
# Each case makes fresh inputs from a seed (same layout for every seed) and calls one public
# wrapper, returning every tensor it produced or mutated.


def _randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def _weight(seed: int, n: int) -> torch.Tensor:
    return 1.0 + 0.2 * _randn(seed + 99, n)


def _rope_inputs(seed: int, t: int = 5, hq: int = 4, hkv: int = 2, d: int = 64) -> list[Any]:
    big = _randn(seed, t, (hq + 2 * hkv) * d + 16, scale=2.0)
    qkv = big[:, : (hq + 2 * hkv) * d]  # strided rows
    ang = _randn(seed + 1, t, d)
    return [qkv, _weight(seed, d), _weight(seed + 1, d), ang.cos(), ang.sin(), hq, hkv, d]


def _call_qk_norm_rope(qkv: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    F.qk_norm_rope_(qkv, *args, EPS)
    return (qkv,)


CASES: dict[
    str, tuple[str, Callable[[int], list[Any]], Callable[..., tuple[torch.Tensor, ...]]]
] = {
    "rmsnorm": (
        "fused_rmsnorm",
        lambda s: [_randn(s, 5, 96)[:, :64], _weight(s, 64)],
        lambda x, w: (F.rmsnorm(x, w, EPS),),
    ),
    "rmsnorm_in_place": (
        "fused_rmsnorm",
        lambda s: [_randn(s, 5, 64), _weight(s, 64)],
        lambda x, w: (F.rmsnorm(x, w, EPS, out=x), x),
    ),
    "fused_add_rmsnorm": (
        "fused_add_rmsnorm_",
        lambda s: [_randn(s, 5, 72)[:, :64], _randn(s + 1, 5, 64, scale=4.0), _weight(s, 64)],
        lambda x, r, w: F.fused_add_rmsnorm(x, r, w, EPS),
    ),
    "qk_norm_rope_": ("qk_norm_rope_", _rope_inputs, _call_qk_norm_rope),
    "silu_and_mul": (
        "fused_silu_and_mul",
        lambda s: [_randn(s, 5, 2 * 200 + 8, scale=3.0)[:, :400]],
        lambda x: (F.silu_and_mul(x),),
    ),
    "fp8_quant_per_token": (
        "fp8_quant_per_token",
        lambda s: [_randn(s, 5, 200, scale=3.0)],
        lambda x: F.fp8_quant_per_token(x),
    ),
    "rmsnorm_fp8": (
        "fused_rmsnorm_fp8",
        lambda s: [_randn(s, 5, 64), _weight(s, 64)],
        lambda x, w: F.rmsnorm_fp8(x, w, EPS),
    ),
    "fused_add_rmsnorm_fp8": (
        "fused_add_rmsnorm_fp8",
        lambda s: [_randn(s, 5, 72)[:, :64], _randn(s + 1, 5, 64), _weight(s, 64)],
        lambda x, r, w: F.fused_add_rmsnorm_fp8(x, r, w, EPS),
    ),
    "silu_and_mul_fp8": (
        "fused_silu_and_mul_fp8",
        lambda s: [_randn(s, 5, 128, scale=3.0)],
        lambda x: F.silu_and_mul_fp8(x),
    ),
}


def _assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u.float(), v.float())


# ----------------------------------------------------------------------------- (a) which path


@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_skips_the_dispatcher_once_a_plan_exists(
    case: str, op_calls: Counter[str], launches: list[str]
) -> None:
    op, make, call = CASES[case]
    # First call with a layout: through torch.ops, whose implementation checks and plans.
    first = call(*make(0))
    assert op_calls[op] == 1 and len(launches) == 1
    # Same layout, other data: replayed directly -- no dispatcher, still one launch per call.
    direct = call(*make(1))
    call(*make(2))
    assert op_calls[op] == 1 and len(launches) == 3
    assert not torch.equal(first[0].float(), direct[0].float())
    # The op path (what any tracer or the profiler sees) computes exactly the same.
    F._plans.clear()
    _assert_same(call(*make(1)), direct)
    assert op_calls[op] == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_profiler_sees_the_named_op(case: str, op_calls: Counter[str]) -> None:
    op, make, call = CASES[case]
    direct = call(*make(1))
    call(*make(1))  # a plan exists now
    n = op_calls[op]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = call(*make(1))
    assert op_calls[op] == n + 1
    assert f"slipstream::{op}" in {e.name for e in prof.events()}
    _assert_same(profiled, direct)
    call(*make(1))
    assert op_calls[op] == n + 1  # direct again once the profiler stops


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dispatch_mode_and_make_fx_see_the_op(case: str, op_calls: Counter[str]) -> None:
    op, make, call = CASES[case]
    direct = call(*make(1))
    call(*make(1))  # a plan exists now
    n = op_calls[op]
    with _Recorder() as rec:
        recorded = call(*make(1))
    assert f"slipstream.{op}.default" in rec.ops
    assert op_calls[op] == n + 1
    _assert_same(recorded, direct)

    inputs = make(1)
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    scalars = inputs[len(tensors) :]
    gm = make_fx(lambda *ts: call(*ts, *scalars))(*tensors)
    assert op_calls[op] > n + 1  # make_fx may run the function more than once
    assert f"slipstream.{op}.default" in {str(node.target) for node in gm.graph.nodes}
    _assert_same(tuple(gm(*make(1)[: len(tensors)])), direct)


def test_compile_traces_the_op() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    x, r, w = CASES["fused_add_rmsnorm"][1](1)
    want = F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS)
    F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS)  # a plan exists now
    fn = torch.compile(
        lambda a, b, c: F.fused_add_rmsnorm(a, b, c, EPS), backend=backend, fullgraph=True
    )
    got = fn(x, r, w)
    assert "slipstream.fused_add_rmsnorm_" in graphs[0].code
    _assert_same(got, want)


def test_functorch_transforms_take_the_op_path() -> None:
    x, r, w = CASES["fused_add_rmsnorm"][1](1)
    F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS)  # a plan exists now
    seen: list[bool] = []

    def fn(a: torch.Tensor) -> torch.Tensor:
        seen.append(eager_direct_ok(a, r, w))
        return a

    torch.func.functionalize(fn)(x)
    torch.vmap(fn)(x)
    assert seen == [False, False]
    assert eager_direct_ok(x, r, torch.nn.Parameter(w))  # plain eager call; weights are Parameters


# ----------------------------------------------------------------------------- (b) bad arguments


def _buf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEV)


def _bad_cases() -> list[tuple[str, Callable[[], Any], Callable[[], Any], type, str]]:
    """(id, a good call, a bad call with the same shapes and strides, error type, message)."""
    w = torch.ones(64, device=DEV)
    x, r, b = _buf(4, 64), _buf(4, 64), _buf(4, 65)
    b2 = _buf(4, 65)
    qkv_args = _rope_inputs(3, t=3)
    qkv, qw, kw, cos, sin = qkv_args[:5]
    # cos/sin with qkv's row stride, so the bad (aliasing) call has the good call's layout
    cos_buf = _buf(3, qkv.stride(0))
    sin_buf = _buf(3, qkv.stride(0))
    cos_buf[:, :64] = cos
    sin_buf[:, :64] = sin
    g = _buf(4, 64)
    o = _buf(4, 64)
    return [
        (
            "add_rmsnorm_residual_is_x",
            lambda: F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS),
            lambda: F.fused_add_rmsnorm(x, x, w, EPS),
            ValueError,
            "fused_add_rmsnorm: `residual` overlaps `x`",
        ),
        (
            "add_rmsnorm_partial_overlap",
            lambda: F.fused_add_rmsnorm(b[:, :64], b2[:, 1:], w, EPS),
            lambda: F.fused_add_rmsnorm(b[:, :64], b[:, 1:], w, EPS),
            ValueError,
            "fused_add_rmsnorm: `residual` overlaps `x`",
        ),
        (
            "add_rmsnorm_weight_dtype",
            lambda: F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS),
            lambda: F.fused_add_rmsnorm(x.clone(), r.clone(), w.half(), EPS),
            TypeError,
            "`weight` dtype torch.float16 differs from `x`'s torch.float32",
        ),
        (
            "add_rmsnorm_eps",
            lambda: F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS),
            lambda: F.fused_add_rmsnorm(x.clone(), r.clone(), w, float("nan")),
            ValueError,
            "`eps` must be finite and >= 0",
        ),
        (
            "add_rmsnorm_fp8_residual_is_x",
            lambda: F.fused_add_rmsnorm_fp8(x, r.clone(), w, EPS),
            lambda: F.fused_add_rmsnorm_fp8(x, x, w, EPS),
            ValueError,
            "fused_add_rmsnorm_fp8: `residual` overlaps `x`",
        ),
        (
            "rmsnorm_fp8_weight_dtype",
            lambda: F.rmsnorm_fp8(x, w, EPS),
            lambda: F.rmsnorm_fp8(x, w.half(), EPS),
            TypeError,
            "rmsnorm_fp8: `weight` dtype",
        ),
        (
            "rmsnorm_out_shifted_view",  # same layout as x, in place allowed, but not this
            lambda: F.rmsnorm(b[:, :64], w, EPS, out=b[:, :64]),
            lambda: F.rmsnorm(b[:, :64], w, EPS, out=b[:, 1:]),
            ValueError,
            "rmsnorm: `out` overlaps `x` without being the very same view",
        ),
        (
            "rmsnorm_eps",
            lambda: F.rmsnorm(x, w, EPS),
            lambda: F.rmsnorm(x, w, -1.0),
            ValueError,
            "rmsnorm: `eps` must be finite and >= 0, got -1.0",
        ),
        (
            "qk_norm_rope_cos_in_qkv",
            lambda: F.qk_norm_rope_(qkv, qw, kw, cos_buf[:, :64], sin, 4, 2, 64, EPS),
            lambda: F.qk_norm_rope_(qkv, qw, kw, qkv[:, :64], sin, 4, 2, 64, EPS),
            ValueError,
            "qk_norm_rope_: `qkv` overlaps `cos`",
        ),
        (
            "qk_norm_rope_sin_in_qkv",
            lambda: F.qk_norm_rope_(qkv, qw, kw, cos, sin_buf[:, :64], 4, 2, 64, EPS),
            lambda: F.qk_norm_rope_(qkv, qw, kw, cos, qkv[:, 64:128], 4, 2, 64, EPS),
            ValueError,
            "qk_norm_rope_: `qkv` overlaps `sin`",
        ),
        (
            "qk_norm_rope_weight_dtype",
            lambda: F.qk_norm_rope_(qkv, qw, kw, cos, sin, 4, 2, 64, EPS),
            lambda: F.qk_norm_rope_(qkv, qw, kw.half(), cos, sin, 4, 2, 64, EPS),
            TypeError,
            "qk_norm_rope_: `k_weight` dtype",
        ),
        (
            "silu_and_mul_out_in_x",
            lambda: F.silu_and_mul(g, out=o[:, :32]),
            lambda: F.silu_and_mul(g, out=g[:, :32]),
            ValueError,
            "silu_and_mul: `out` overlaps `x`",
        ),
        (
            "fp8_quant_scale_dtype",
            lambda: F.fp8_quant_per_token(x),
            lambda: F.fp8_quant_per_token(x, scale=torch.empty(4, 1, device=DEV).double()),
            TypeError,
            "fp8_quant_per_token: `scale` must be a float32 tensor",
        ),
    ]


BAD = (
    "add_rmsnorm_residual_is_x",
    "add_rmsnorm_partial_overlap",
    "add_rmsnorm_weight_dtype",
    "add_rmsnorm_eps",
    "add_rmsnorm_fp8_residual_is_x",
    "rmsnorm_fp8_weight_dtype",
    "rmsnorm_out_shifted_view",
    "rmsnorm_eps",
    "qk_norm_rope_cos_in_qkv",
    "qk_norm_rope_sin_in_qkv",
    "qk_norm_rope_weight_dtype",
    "silu_and_mul_out_in_x",
    "fp8_quant_scale_dtype",
)


def test_bad_cases_listed() -> None:
    assert tuple(c[0] for c in _bad_cases()) == BAD


@pytest.mark.parametrize("name", BAD)
def test_bad_argument_raises_before_and_after_a_good_call(name: str, launches: list[str]) -> None:
    _, good, bad, exc, msg = {c[0]: c for c in _bad_cases()}[name]
    with pytest.raises(exc, match=re.escape(msg)):
        bad()
    assert launches == []
    good()
    good()  # replayed from its plan
    n = len(launches)
    assert n == 2
    for _ in range(2):
        with pytest.raises(exc, match=re.escape(msg)):
            bad()
        assert len(launches) == n, "a bad call launched"
    good()
    assert len(launches) == n + 1


def test_bad_argument_through_torch_ops_after_a_good_call(launches: list[str]) -> None:
    """The op implementations replay plans too; the overlap check still runs there."""
    x, r, w = _buf(4, 64), _buf(4, 64), torch.ones(64, device=DEV)
    torch.ops.slipstream.fused_add_rmsnorm_(x, r, w, EPS)
    torch.ops.slipstream.fused_add_rmsnorm_(x, r, w, EPS)
    with pytest.raises(ValueError, match="`residual` overlaps `x`"):
        torch.ops.slipstream.fused_add_rmsnorm_(x, x, w, EPS)
    q, s = F.rmsnorm_fp8(x, w, EPS)
    with pytest.raises(ValueError, match=r"`scale` must be a contiguous \(4, 1\) tensor"):
        torch.ops.slipstream.fused_rmsnorm_fp8(x, w, EPS, q, torch.empty(4, 2, device=DEV)[:, :1])
    assert len(launches) == 3


def test_direct_impl_call_still_type_checks_ints() -> None:
    """Plans are keyed on exact int / float scalars: a bool never rides on an int's plan."""
    qkv, qw, kw, cos, sin = _rope_inputs(0, t=3, hq=1, hkv=1, d=64)[:5]
    F.qk_norm_rope_(qkv, qw, kw, cos, sin, 1, 1, 64, EPS)
    F._qk_norm_rope_impl(qkv, qw, kw, cos, sin, 1, 1, 64, EPS)  # replayed
    with pytest.raises(ValueError, match="`num_heads` must be an int >= 0 .*, got True"):
        F._qk_norm_rope_impl(qkv, qw, kw, cos, sin, True, 1, 64, EPS)


@pytest.mark.skipif(not ON_CPU, reason="interpreter rule")
def test_cpu_plan_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _buf(4, 64)
    w = torch.ones(64, device=DEV)
    F.rmsnorm(x, w, EPS)
    F.rmsnorm(x, w, EPS)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensors need the Triton interpreter"):
        F.rmsnorm(x, w, EPS)
    with pytest.raises(RuntimeError, match="CPU tensors need the Triton interpreter"):
        torch.ops.slipstream.fused_rmsnorm(x, w, EPS, torch.empty_like(x))


def test_meta_tensors_keep_the_op_semantics() -> None:
    """Meta tensors never get a plan: they reach the op, whose fake implementation runs."""
    x = torch.empty(4, 64, device="meta")
    w = torch.empty(64, device="meta")
    assert F.rmsnorm(x, w, EPS).device.type == "meta"
    assert F.rmsnorm(x, w, EPS).device.type == "meta"
    assert not F._plans


# ----------------------------------------------------------------------------- (c) results


def _fp8_step(v: torch.Tensor) -> torch.Tensor:
    e = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return 2.0 ** (e - 3)


def _assert_fp8(q: torch.Tensor, s: torch.Tensor, want: torch.Tensor) -> None:
    """(q, s) against the per-token fp8 quantisation of ``want`` (see test_kernels_fused)."""
    want_q, want_s = F.fp8_quant_per_token_ref(want)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    got, ref = q.float(), want_q.float()
    diff = got != ref
    pow2 = ref.abs() == 2.0 ** torch.round(torch.log2(ref.abs().clamp(min=1e-30)))
    ok = ~diff | ((got - ref).abs() <= _fp8_step(ref) + 1e-12)
    if ON_CPU:  # the interpreter's fp8 conversion drops the carry to a power of two
        ok |= pow2 & (got == ref / 2)
    assert bool(ok.all())
    assert diff.float().mean().item() < 0.06


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("max_plans", [4096, 3])
def test_results_match_references_across_hits_and_misses(
    max_plans: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(F, "_MAX_PLANS", max_plans)
    for t in (3, 1, 7, 3, 7, 1):  # misses, then hits (or evictions with a tiny cache)
        for seed in (t, t + 100):
            x = _randn(seed, t, 72)[:, :64]
            r = _randn(seed + 1, t, 64, scale=4.0)
            w = _weight(seed, 64)
            _close(F.rmsnorm(x, w, EPS), F.rmsnorm_ref(x, w, EPS))
            q, s = F.rmsnorm_fp8(x, w, EPS)
            _assert_fp8(q, s, F.rmsnorm_ref(x, w, EPS))

            summed = x + r
            h, r2 = F.fused_add_rmsnorm(x.clone(), r.clone(), w, EPS)
            assert torch.equal(r2, summed)
            _close(h, F.rmsnorm_ref(summed, w, EPS))
            r3 = r.clone()
            q, s, _ = F.fused_add_rmsnorm_fp8(x, r3, w, EPS)
            assert torch.equal(r3, summed)
            _assert_fp8(q, s, F.rmsnorm_ref(summed, w, EPS))

            xin = x.clone()
            F.rmsnorm(xin, w, EPS, out=xin)
            _close(xin, F.rmsnorm_ref(x, w, EPS))

            qkv, qw, kw, cos, sin, hq, hkv, d = _rope_inputs(seed, t=t)
            q_in = qkv[:, : hq * d].reshape(t, hq, d).clone()
            k_in = qkv[:, hq * d : (hq + hkv) * d].reshape(t, hkv, d).clone()
            v_in = qkv[:, (hq + hkv) * d :].clone()
            F.qk_norm_rope_(qkv, qw, kw, cos, sin, hq, hkv, d, EPS)
            _close(
                qkv[:, : hq * d].view(t, hq, d),
                F.rope_ref(F.rmsnorm_ref(q_in, qw, EPS), cos, sin),
            )
            _close(
                qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d),
                F.rope_ref(F.rmsnorm_ref(k_in, kw, EPS), cos, sin),
            )
            assert torch.equal(qkv[:, (hq + hkv) * d :], v_in)

            g = _randn(seed, t, 208, scale=3.0)[:, :200]
            _close(F.silu_and_mul(g), F.silu_and_mul_ref(g))
            q, s = F.silu_and_mul_fp8(g)
            _assert_fp8(q, s, F.silu_and_mul_ref(g))
            q, s = F.fp8_quant_per_token(g)
            _assert_fp8(q, s, g)
        assert len(F._plans) <= max_plans


def test_empty_inputs_replay_as_no_ops(launches: list[str]) -> None:
    w = torch.ones(64, device=DEV)
    for _ in range(2):
        x = torch.empty(0, 64, device=DEV)
        assert F.rmsnorm(x, w, EPS).shape == (0, 64)
        F.fused_add_rmsnorm(x, torch.empty(0, 64, device=DEV), w, EPS)
        q, s = F.rmsnorm_fp8(x, w, EPS)
        assert q.shape == (0, 64) and s.shape == (0, 1)
        assert F.silu_and_mul(x).shape == (0, 32)
        assert F.silu_and_mul_fp8(x)[0].shape == (0, 32)
        assert F.fp8_quant_per_token(x)[0].shape == (0, 64)
    assert launches == []
