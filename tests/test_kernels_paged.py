"""Paged KV kernels (store, prefill/extend, decode with split-K) against a float64 reference.

On CPU they run under the Triton interpreter: shapes stay tiny.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from slipstream.attention.paged import (  # noqa: E402
    paged_decode_torch,
    paged_prefill_torch,
    store_kv_torch,
)
from slipstream.kernels.paged_attn import (  # noqa: E402
    paged_decode_attn,
    paged_prefill_attn,
    paged_store_kv,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D = 16


class Paged:
    """A random paged pool holding each sequence's first ``prefix`` tokens, pages scattered."""

    def __init__(
        self,
        kv_lens: list[int],
        hkv: int,
        page_size: int,
        dtype: torch.dtype,
        seed: int = 0,
        d: int = D,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.page_size = page_size
        n_pages = [-(-n // page_size) for n in kv_lens]
        total = sum(n_pages) + 3  # spare pages stay garbage: reading them would show
        perm = torch.randperm(total, generator=g).tolist()
        self.page_tables: list[list[int]] = []
        i = 0
        for n in n_pages:
            self.page_tables.append(perm[i : i + n])
            i += n
        self.k_cache = torch.randn(total, page_size, hkv, d, generator=g).to(DEV, dtype)
        self.v_cache = torch.randn(total, page_size, hkv, d, generator=g).to(DEV, dtype)
        width = max(max(n_pages), 1)
        pt = torch.zeros(len(kv_lens), width, dtype=torch.int32)
        for b, pages in enumerate(self.page_tables):
            pt[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.page_table = pt.to(DEV)

    def slots(self, b: int, start: int, n: int) -> list[int]:
        ps = self.page_size
        return [self.page_tables[b][i // ps] * ps + i % ps for i in range(start, start + n)]

    def dense(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n keys/values of sequence b, [n, Hkv, D] float64."""
        idx = torch.tensor(self.slots(b, 0, n), dtype=torch.long, device=DEV)
        kf = self.k_cache.flatten(0, 1)[idx].double()
        vf = self.v_cache.flatten(0, 1)[idx].double()
        return kf, vf


def _ref_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] float64, bottom-right causal -> [Lq, Hq, D]."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    qi = torch.arange(lq, device=q.device)[:, None]
    kj = torch.arange(lk, device=q.device)[None, :]
    s = s.masked_fill(kj > qi + (lk - lq), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def _qkv(
    t: int, hq: int, hkv: int, dtype: torch.dtype, seed: int, d: int = D
) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided column views of one packed qkv buffer (as the model hands them)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    return q, k, v


def test_ops_are_registered_as_mutating_out() -> None:
    for name, arg in (
        ("paged_store_kv", "k_cache"),
        ("paged_prefill_attn", "out"),
        ("paged_decode_attn", "out"),
    ):
        schema = getattr(torch.ops.slipstream, name).default._schema
        (a,) = [x for x in schema.arguments if x.name == arg]
        assert a.alias_info is not None and a.alias_info.is_write, name
        assert len(schema.returns) == 0


@pytest.mark.parametrize("page_size", [4, 16])
def test_store_kv_writes_only_its_slots(page_size: int) -> None:
    pool = Paged([9, 1, 6], hkv=2, page_size=page_size, dtype=torch.float32)
    before_k, before_v = pool.k_cache.clone(), pool.v_cache.clone()
    _, k, v = _qkv(5, 4, 2, torch.float32, seed=1)
    slots = pool.slots(0, 7, 2) + pool.slots(1, 0, 1) + [-1] + pool.slots(2, 5, 1)
    paged_store_kv(k, v, pool.k_cache, pool.v_cache, torch.tensor(slots, device=DEV))
    ref_k, ref_v = before_k.flatten(0, 1), before_v.flatten(0, 1)
    keep = [i for i, s in enumerate(slots) if s >= 0]
    idx = torch.tensor([slots[i] for i in keep], device=DEV)
    ref_k[idx] = k[keep]
    ref_v[idx] = v[keep]
    assert torch.equal(pool.k_cache.flatten(0, 1), ref_k)
    assert torch.equal(pool.v_cache.flatten(0, 1), ref_v)
    # the torch path does the same (without the skip)
    tk, tv = before_k.clone(), before_v.clone()
    store_kv_torch(k[keep], v[keep], tk, tv, idx)
    assert torch.equal(tk.flatten(0, 1), ref_k) and torch.equal(tv.flatten(0, 1), ref_v)


PREFILL_CASES = [
    # (prefix lens, new lens, hq, hkv, page size)
    ([0, 0], [1, 7], 2, 2, 4),
    ([5, 0, 16, 1], [3, 18, 1, 2], 4, 2, 4),
    ([13, 3], [5, 1], 4, 1, 16),
    ([17], [20], 2, 2, 16),
]


@pytest.mark.parametrize(
    "case", PREFILL_CASES, ids=lambda c: f"pre{c[0]}-new{c[1]}-g{c[2] // c[3]}-p{c[4]}"
)
@pytest.mark.parametrize("dtype", [torch.float32])
def test_paged_prefill_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    prefix, new, hq, hkv, ps = case
    _run_prefill(prefix, new, hq, hkv, ps, dtype)


def _run_prefill(
    prefix: list[int],
    new: list[int],
    hq: int,
    hkv: int,
    ps: int,
    dtype: torch.dtype,
    d: int = D,
) -> None:
    kv = [p + n for p, n in zip(prefix, new, strict=True)]
    pool = Paged(kv, hkv=hkv, page_size=ps, dtype=dtype, seed=2, d=d)
    t = sum(new)
    q, k, v = _qkv(t, hq, hkv, dtype, seed=3, d=d)
    slots = [s for b in range(len(new)) for s in pool.slots(b, prefix[b], new[b])]
    slot_t = torch.tensor(slots, device=DEV)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    pre_t = torch.tensor(prefix, dtype=torch.int32, device=DEV)
    scale = 0.3
    torch_k, torch_v = pool.k_cache.clone(), pool.v_cache.clone()

    paged_store_kv(k, v, pool.k_cache, pool.v_cache, slot_t)
    out = torch.full((t, hq, d), float("nan"), dtype=dtype, device=DEV)
    paged_prefill_attn(
        q, k, v, out, pool.k_cache, pool.v_cache, pool.page_table, cu, pre_t, max(new), scale
    )
    assert not torch.isnan(out).any()

    start = 0
    for b, n in enumerate(new):
        kd, vd = pool.dense(b, kv[b])
        ref = _ref_attn(q[start : start + n].double(), kd, vd, scale)
        err = (out[start : start + n].double() - ref).abs().max().item()
        assert err < _tol(dtype), f"seq {b}: max error {err}"
        start += n

    # The torch backend's path over the same pool agrees.
    from slipstream.attention.paged import build_paged_metadata

    store_kv_torch(k, v, torch_k, torch_v, slot_t)
    meta = build_paged_metadata(
        extend_lens=new,
        prefix_lens=prefix,
        page_tables=pool.page_tables,
        slot_mapping=slots,
        k_caches=(torch_k,),
        v_caches=(torch_v,),
        page_size=ps,
        device=torch.device(DEV),
        is_decode=False,
    )
    out_t = torch.full_like(out, float("nan"))
    paged_prefill_torch(q, out_t, torch_k, torch_v, meta, scale)
    assert (out_t.double() - out.double()).abs().max().item() < _tol(dtype)


DECODE_CASES = [
    # (kv lens, hq, hkv, page size, num splits)
    ([1, 5, 17, 33], 4, 2, 4, 1),
    ([1, 5, 17, 33], 4, 2, 4, 3),
    ([2, 40], 2, 2, 16, 1),
    ([2, 40], 2, 2, 16, 4),
    ([7, 64, 3], 8, 2, 16, 2),
]


@pytest.mark.parametrize(
    "case", DECODE_CASES, ids=lambda c: f"kv{c[0]}-g{c[1] // c[2]}-p{c[3]}-s{c[4]}"
)
def test_paged_decode_matches_reference(case: tuple) -> None:
    kv, hq, hkv, ps, splits = case
    _run_decode(kv, hq, hkv, ps, splits, torch.float32)


def _run_decode(
    kv: list[int], hq: int, hkv: int, ps: int, splits: int, dtype: torch.dtype, d: int = D
) -> None:
    pool = Paged(kv, hkv=hkv, page_size=ps, dtype=dtype, seed=4, d=d)
    b = len(kv)
    q, _, _ = _qkv(b, hq, hkv, dtype, seed=5, d=d)
    kv_t = torch.tensor(kv, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    out = torch.full((b, hq, d), float("nan"), dtype=dtype, device=DEV)
    paged_decode_attn(q, out, pool.k_cache, pool.v_cache, pool.page_table, kv_t, splits, scale)
    assert not torch.isnan(out).any()
    for i in range(b):
        kd, vd = pool.dense(i, kv[i])
        ref = _ref_attn(q[i : i + 1].double(), kd, vd, scale)[0]
        err = (out[i].double() - ref).abs().max().item()
        assert err < _tol(dtype), f"seq {i}: max error {err}"
    out_t = torch.full_like(out, float("nan"))
    paged_decode_torch(q, out_t, pool.k_cache, pool.v_cache, pool.page_table, kv_t, scale)
    assert (out_t.double() - out.double()).abs().max().item() < _tol(dtype)


def test_decode_writes_into_a_strided_out_view() -> None:
    """``out`` may be a column slice of a larger buffer; nothing outside it is touched."""
    kv, hq, hkv, ps = [3, 9], 4, 2, 4
    pool = Paged(kv, hkv=hkv, page_size=ps, dtype=torch.float32, seed=6)
    q, _, _ = _qkv(2, hq, hkv, torch.float32, seed=7)
    big = torch.full((2, 2 * hq * D), 7.0, device=DEV)
    out = big[:, hq * D :].view(2, hq, D)
    kv_t = torch.tensor(kv, dtype=torch.int32, device=DEV)
    paged_decode_attn(q, out, pool.k_cache, pool.v_cache, pool.page_table, kv_t, 2, 0.25)
    assert torch.all(big[:, : hq * D] == 7.0)
    ref = torch.empty_like(out)
    paged_decode_torch(q, ref, pool.k_cache, pool.v_cache, pool.page_table, kv_t, 0.25)
    assert (out - ref).abs().max().item() < 2e-5


def test_wrappers_reject_bad_arguments() -> None:
    pool = Paged([3], hkv=2, page_size=4, dtype=torch.float32)
    q, k, v = _qkv(1, 4, 2, torch.float32, seed=0)
    out = torch.empty(1, 4, D, device=DEV)
    with pytest.raises(TypeError, match="kv_lens"):
        paged_decode_attn(
            q, out, pool.k_cache, pool.v_cache, pool.page_table, torch.tensor([3], device=DEV), 1
        )
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attn(
            q,
            out,
            pool.k_cache,
            pool.v_cache,
            pool.page_table,
            torch.tensor([30], dtype=torch.int32, device=DEV),
            1,
        )
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attn(
            q,
            out,
            pool.k_cache,
            pool.v_cache,
            pool.page_table,
            torch.tensor([3], dtype=torch.int32, device=DEV),
            0,
        )
    with pytest.raises(ValueError, match="slot"):
        paged_store_kv(k, v, pool.k_cache, pool.v_cache, torch.tensor([10**6], device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernels_low_precision(dtype: torch.dtype) -> None:
    _run_prefill([5, 0, 16, 1], [3, 18, 1, 2], 4, 2, 4, dtype)
    _run_prefill([300, 17], [129, 64], 8, 2, 16, dtype)
    _run_decode([1, 5, 17, 33], 4, 2, 4, 1, dtype)
    _run_decode([1, 500, 1700, 33], 8, 2, 16, 8, dtype)
    # The real head size (Qwen3: 128) and GQA 2, with and without split-K.
    _run_prefill([0, 300, 5], [257, 129, 1], 16, 8, 16, dtype, d=128)
    _run_decode([1, 700, 64, 3000], 16, 8, 16, 1, dtype, d=128)
    _run_decode([1, 700, 64, 3000], 16, 8, 16, 6, dtype, d=128)
