"""Attention kernel benchmark (GPU): slipstream's Triton varlen kernel vs torch SDPA back-ends.

    python benchmarks/attention_bench.py --json OUT.json --plot OUT.png
    python benchmarks/attention_bench.py --variants base,wide,gqa_pack --json OUT.json --plot OUT.png

Cases (bf16, 16 query heads, 8 kv heads, head_dim 128 by default):
  a  one causal 7168-token sequence
  b  a packed mixed batch, causal: per item, with probability 0.50 a length log-uniform in
     [8, 128], 0.35 in [256, 1024], 0.15 in [2048, 8192] (numpy default_rng(seed)); up to
     --items items or --max-tokens tokens
  c  like a, bidirectional          d  like b, bidirectional   (extra; --cases a,b to skip)

Methods: slipstream (packed [T, H, D], output written into a preallocated buffer; with
--variants, one method "slipstream:<variant>" per kernel variant, selected through
SLIPSTREAM_FLASH_VARIANT, each autotuned, timed and checked in the same run and compared
side by side in a variant table);
sdpa_flash / sdpa_cudnn (SDPA with one back-end forced, layout [B, H, L, D]: B=1 for a single
sequence, a right-padded batch for a mixed batch; FLOP/s count only real tokens, so padding
shows up as lower throughput); sdpa_flash_loop (mixed batch: SDPA flash per sequence in a
Python loop); varlen_attn (torch.nn.attention.varlen, when this torch has it).
GQA for SDPA uses enable_gqa=True when the back-end accepts it, else K/V heads are expanded
once, outside the timed region. Any method that fails is recorded as an error string.

FLOPs: causal 4*Hq*D*sum(L*(L+1)/2), bidirectional 4*Hq*D*sum(L^2). Times are
triton.testing.do_bench medians. The kernel's output is checked against SDPA in the same run;
a relative error above 1e-2 is reported loudly and makes the exit status 1 (after the JSON and
the plot are written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REL_ERR_LIMIT = 1e-2
DEVICE = "cuda"  # --device; "cpu" is only a dry run of this script's logic (Triton interpreter)


def _sync(torch: Any) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _empty_cache(torch: Any) -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _bench_ms(triton: Any, fn: Callable[[], Any], warmup: float, rep: float) -> float:
    """Median time in ms: triton.testing.do_bench on GPU, a few wall-clock runs on CPU."""
    if DEVICE == "cuda":
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


METHODS = ("slipstream", "sdpa_flash", "sdpa_cudnn", "sdpa_flash_loop", "varlen_attn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    p.add_argument("--cases", default="a,b,c,d", help="comma list of a,b,c,d (default: all)")
    p.add_argument("--seqlen", type=int, default=7168, help="length for cases a/c")
    p.add_argument("--items", type=int, default=64, help="max items in the mixed batch")
    p.add_argument("--max-tokens", type=int, default=65536, help="max tokens in the mixed batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hq", type=int, default=16, help="query heads")
    p.add_argument("--hkv", type=int, default=8, help="kv heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument(
        "--device",
        default="cuda",
        help="cuda (default); cpu only dry-runs the script with tiny sizes (Triton interpreter)",
    )
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time (ms)")
    p.add_argument(
        "--quick", action="store_true", help="small smoke run (seqlen 1024, 16 items, 8k tokens)"
    )
    p.add_argument(
        "--variants",
        default="",
        help="comma list of slipstream kernel variants to A/B (e.g. base,wide,gqa_pack, or 'all');"
        " default: only the SLIPSTREAM_FLASH_VARIANT / default one, reported as 'slipstream'",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------


def mixed_lengths(seed: int, items: int, max_tokens: int) -> list[int]:
    """Seeded mixed-length batch: 50% [8,128], 35% [256,1024], 15% [2048,8192], log-uniform;
    `items` items, or fewer if `max_tokens` is reached first (the last item is then cut)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bands = ((0.50, 8, 128), (0.35, 256, 1024), (0.15, 2048, 8192))
    lens: list[int] = []
    total = 0
    while len(lens) < items:
        u = rng.random()
        acc = 0.0
        lo, hi = bands[-1][1:]
        for prob, b_lo, b_hi in bands:
            acc += prob
            if u < acc:
                lo, hi = b_lo, b_hi
                break
        n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        n = min(n, max_tokens - total)  # the item that reaches the token budget is cut
        lens.append(n)
        total += n
        if total >= max_tokens:
            break
    return lens


def attention_flops(lens: list[int], hq: int, d: int, causal: bool) -> float:
    if causal:
        return 4.0 * hq * d * sum(n * (n + 1) / 2 for n in lens)
    return 4.0 * hq * d * sum(n * n for n in lens)


# ----------------------------------------------------------------------------------------
# Methods. Each builder does its setup (allocation, layout changes, K/V expansion) outside
# the timed region and returns (timed_fn, packed_output_fn, note); packed_output_fn returns
# the last result as [T, Hq, D] for the correctness comparison.
# ----------------------------------------------------------------------------------------


def _sdpa_call(torch: Any, backend: Any, q4: Any, k4: Any, v4: Any, causal: bool, gqa: bool):
    from torch.nn.attention import sdpa_kernel

    f = torch.nn.functional.scaled_dot_product_attention

    def call() -> Any:
        with sdpa_kernel(backend):
            if gqa:
                return f(q4, k4, v4, is_causal=causal, enable_gqa=True)
            return f(q4, k4, v4, is_causal=causal)

    return call


def _with_gqa_fallback(torch: Any, make: Callable[[bool], Callable[[], Any]]):
    """Try native GQA (enable_gqa=True); if the back-end refuses, expand K/V heads instead."""
    try:
        fn = make(True)
        fn()
        _sync(torch)
        return fn, "native GQA (enable_gqa=True)"
    except Exception as exc:  # noqa: BLE001 - any refusal means: try the expanded layout
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    fn = make(False)
    fn()
    _sync(torch)
    return fn, f"K/V heads expanded outside timing (enable_gqa failed: {first})"


class _variant_env:
    """Set SLIPSTREAM_FLASH_VARIANT while one slipstream method is built, timed and read out
    (the kernel reads it on every call); None leaves the environment alone."""

    def __init__(self, variant: str | None) -> None:
        self.variant, self.old = variant, None

    def __enter__(self) -> None:
        if self.variant is not None:
            self.old = os.environ.get("SLIPSTREAM_FLASH_VARIANT")
            os.environ["SLIPSTREAM_FLASH_VARIANT"] = self.variant

    def __exit__(self, *exc: Any) -> None:
        if self.variant is not None:
            if self.old is None:
                os.environ.pop("SLIPSTREAM_FLASH_VARIANT", None)
            else:
                os.environ["SLIPSTREAM_FLASH_VARIANT"] = self.old


def _variant_of(method: str) -> str | None:
    """'slipstream:gqa_pack' -> 'gqa_pack'; 'slipstream' -> None (environment default)."""
    return method.split(":", 1)[1] if method.startswith("slipstream:") else None


def build_slipstream(torch: Any, w: dict) -> tuple[Callable, Callable, str]:
    from slipstream.kernels import flash_attn_varlen

    out = torch.empty_like(w["q"])

    def call() -> None:
        flash_attn_varlen(
            w["q"], w["k"], w["v"], out, w["cu"], w["cu"], w["max_len"], w["max_len"],
            causal=w["causal"],
        )  # fmt: skip

    t0 = time.perf_counter()
    call()  # first call autotunes (compiles every config once; results cached on disk)
    _sync(torch)
    tune_s = time.perf_counter() - t0
    return call, (lambda: out), f"first call (autotune) {tune_s:.1f}s"


def _padded(torch: Any, w: dict, x: Any, heads: int) -> Any:
    """Packed [T, H, D] -> right-padded [B, H, Lmax, D] (zeros in the padding)."""
    lens, cu = w["lens"], w["cu_list"]
    out = torch.zeros(len(lens), heads, w["max_len"], x.shape[-1], dtype=x.dtype, device=x.device)
    for i, n in enumerate(lens):
        out[i, :, :n] = x[cu[i] : cu[i] + n].transpose(0, 1)
    return out


def _unpad(torch: Any, w: dict, o4: Any) -> Any:
    return torch.cat([o4[i, :, :n].transpose(0, 1) for i, n in enumerate(w["lens"])], dim=0)


def build_sdpa(torch: Any, w: dict, backend_name: str) -> tuple[Callable, Callable, str]:
    """SDPA with one back-end. One sequence: [1, H, L, D]. Mixed: right-padded [B, H, Lmax, D]
    (valid for causal: real queries never see the padding keys; for bidirectional attention the
    padded keys would be attended, so the mixed bidirectional case is not run this way)."""
    from torch.nn.attention import SDPBackend

    backend = getattr(SDPBackend, backend_name)
    hq, hkv, group = w["hq"], w["hkv"], w["hq"] // w["hkv"]
    single = len(w["lens"]) == 1
    if not single and not w["causal"]:
        raise RuntimeError("skipped: padded SDPA is only exact for causal attention")
    if single:
        q4 = w["q"].transpose(0, 1).unsqueeze(0).contiguous()
        k4 = w["k"].transpose(0, 1).unsqueeze(0).contiguous()
        v4 = w["v"].transpose(0, 1).unsqueeze(0).contiguous()
    else:
        q4, k4, v4 = (_padded(torch, w, w[n], h) for n, h in (("q", hq), ("k", hkv), ("v", hkv)))
    last: dict[str, Any] = {}

    def make(gqa: bool) -> Callable[[], Any]:
        kk = k4 if gqa else k4.repeat_interleave(group, dim=1)
        vv = v4 if gqa else v4.repeat_interleave(group, dim=1)
        inner = _sdpa_call(torch, backend, q4, kk, vv, w["causal"], gqa)

        def call() -> Any:
            last["o"] = inner()

        return call

    fn, note = _with_gqa_fallback(torch, make)

    def packed() -> Any:
        o4 = last["o"]
        return o4[0].transpose(0, 1) if single else _unpad(torch, w, o4)

    layout = "[1,H,L,D]" if single else f"padded [B,H,Lmax,D] (B={len(w['lens'])})"
    return fn, packed, f"{layout}; {note}"


def build_sdpa_loop(torch: Any, w: dict) -> tuple[Callable, Callable, str]:
    """SDPA flash per sequence in a Python loop (views of the packed tensors, no copies)."""
    from torch.nn.attention import SDPBackend

    group, cu = w["hq"] // w["hkv"], w["cu_list"]
    views = [
        tuple(w[n][cu[i] : cu[i] + m].transpose(0, 1).unsqueeze(0) for n in ("q", "k", "v"))
        for i, m in enumerate(w["lens"])
    ]
    outs: list[Any] = []

    def make(gqa: bool) -> Callable[[], Any]:
        seqs = [
            (q, k, v) if gqa else (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            for q, k, v in views
        ]
        calls = [
            _sdpa_call(torch, SDPBackend.FLASH_ATTENTION, q, k, v, w["causal"], gqa)
            for q, k, v in seqs
        ]

        def call() -> None:
            outs[:] = [c() for c in calls]

        return call

    fn, note = _with_gqa_fallback(torch, make)

    def packed() -> Any:
        return torch.cat([o[0].transpose(0, 1) for o in outs], dim=0)

    return fn, packed, f"{len(views)} SDPA calls; {note}"


def build_varlen(torch: Any, w: dict) -> tuple[Callable, Callable, str]:
    from torch.nn.attention import varlen as varlen_mod

    varlen_attn = varlen_mod.varlen_attn
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:  # torch 2.10 style
        kwargs["is_causal"] = w["causal"]
    elif "window_size" in params:  # later: causal is window (-1, 0)
        kwargs["window_size"] = (-1, 0) if w["causal"] else (-1, -1)
    elif w["causal"]:
        raise RuntimeError("varlen_attn has neither is_causal nor window_size")
    k, v, note = w["k"], w["v"], "native GQA"
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        group = w["hq"] // w["hkv"]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        note = "K/V heads expanded outside timing"
    last: dict[str, Any] = {}

    def call() -> None:
        last["o"] = varlen_attn(
            w["q"], k, v, w["cu"], w["cu"], w["max_len"], w["max_len"], **kwargs
        )

    call()
    _sync(torch)
    return call, (lambda: last["o"]), f"{note}; kwargs={sorted(kwargs)}"


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def _err(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


def make_workload(torch: Any, lens: list[int], causal: bool, args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    t = sum(lens)
    g = torch.Generator(device=DEVICE).manual_seed(args.seed)
    shape_q, shape_kv = (t, args.hq, args.head_dim), (t, args.hkv, args.head_dim)

    def rnd(shape: tuple[int, ...]) -> Any:
        return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)

    cu_list = [0]
    for n in lens:
        cu_list.append(cu_list[-1] + n)
    return {
        "lens": lens,
        "cu_list": cu_list,
        "cu": torch.tensor(cu_list, dtype=torch.int32, device=DEVICE),
        "max_len": max(lens),
        "causal": causal,
        "hq": args.hq,
        "hkv": args.hkv,
        "q": rnd(shape_q),
        "k": rnd(shape_kv),
        "v": rnd(shape_kv),
    }


def math_reference(torch: Any, w: dict, head_chunk: int = 4) -> Any:
    """fp32 SDPA (math back-end) per sequence, a few heads at a time -> [T, Hq, D] float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = torch.nn.functional.scaled_dot_product_attention
    group, cu, hq = w["hq"] // w["hkv"], w["cu_list"], w["hq"]
    out = torch.empty(w["q"].shape, dtype=torch.float32, device=w["q"].device)
    with sdpa_kernel(SDPBackend.MATH):
        for i, n in enumerate(w["lens"]):
            s = cu[i]
            q = w["q"][s : s + n].float().transpose(0, 1)  # [Hq, n, D]
            k = w["k"][s : s + n].float().repeat_interleave(group, 1).transpose(0, 1)
            v = w["v"][s : s + n].float().repeat_interleave(group, 1).transpose(0, 1)
            for h0 in range(0, hq, head_chunk):
                h1 = min(hq, h0 + head_chunk)
                o = f(q[None, h0:h1], k[None, h0:h1], v[None, h0:h1], is_causal=w["causal"])
                out[s : s + n, h0:h1] = o[0].transpose(0, 1)
    return out


def rel_err(torch: Any, got: Any, ref: Any) -> float:
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def run_case(torch: Any, triton: Any, name: str, desc: str, lens: list[int], causal: bool,
             args: argparse.Namespace) -> dict:  # fmt: skip
    print(f"\n=== case {name}: {desc}", flush=True)
    print(f"    {len(lens)} sequences, {sum(lens)} tokens, max {max(lens)}", flush=True)
    flops = attention_flops(lens, args.hq, args.head_dim, causal)
    res: dict[str, Any] = {
        "description": desc,
        "causal": causal,
        "num_seqs": len(lens),
        "total_tokens": sum(lens),
        "max_len": max(lens),
        "lengths": lens,
        "hq": args.hq,
        "hkv": args.hkv,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "flops": flops,
        "methods": {},
    }
    w = make_workload(torch, lens, causal, args)
    builders: dict[str, Callable[[], tuple[Callable, Callable, str]]] = {}
    for m in slipstream_methods(args):
        builders[m] = lambda: build_slipstream(torch, w)
    builders.update({
        "sdpa_flash": lambda: build_sdpa(torch, w, "FLASH_ATTENTION"),
        "sdpa_cudnn": lambda: build_sdpa(torch, w, "CUDNN_ATTENTION"),
    })  # fmt: skip
    if len(lens) > 1:
        builders["sdpa_flash_loop"] = lambda: build_sdpa_loop(torch, w)
    builders["varlen_attn"] = lambda: build_varlen(torch, w)

    outputs: dict[str, Any] = {}
    for method, build in builders.items():
        entry: dict[str, Any] = {}
        variant = _variant_of(method)
        if variant is not None:
            entry["variant"] = variant
        try:
            with _variant_env(variant):
                fn, packed, note = build()
                entry["note"] = note
                ms = _bench_ms(triton, fn, args.warmup, args.rep)
                _sync(torch)
                entry["ms"] = float(ms)
                entry["tflops"] = flops / (ms * 1e-3) / 1e12
                outputs[method] = packed()
            print(f"    {method:20s} {ms:9.3f} ms  {entry['tflops']:7.1f} TFLOP/s   ({note})")
        except Exception as exc:  # noqa: BLE001 - record and go on: the GPU run is one shot
            entry["error"] = _err(exc)
            print(f"    {method:20s} ERROR {entry['error']}", flush=True)
            if "out of memory" in str(exc).lower():
                _empty_cache(torch)
        res["methods"][method] = entry
        if method.startswith("slipstream") and "error" not in entry:
            entry["autotune"] = autotune_info(w, variant)

    # Correctness: every method vs an fp32 SDPA (math back-end) on the same inputs, untimed.
    corr: dict[str, Any] = {"reference": "sdpa_math_fp32", "limit": REL_ERR_LIMIT}
    try:
        ref = math_reference(torch, w)
        corr["rel_err"] = {m: rel_err(torch, o, ref) for m, o in outputs.items()}
        for m, e in corr["rel_err"].items():
            print(f"    rel err {m:20s} vs fp32 SDPA math: {e:.2e}")
        ours = slipstream_methods(args)
        if "sdpa_flash" in outputs:
            for m in ours:
                if m in outputs:
                    key = "slipstream_vs_sdpa_flash" if m == "slipstream" else f"{m}_vs_sdpa_flash"
                    corr[key] = rel_err(torch, outputs[m], outputs["sdpa_flash"])
        # Every slipstream method (variant) must have run and be within the limit.
        missing = [m for m in ours if m not in corr["rel_err"]]
        bad = [m for m in ours if corr["rel_err"].get(m, 0.0) > REL_ERR_LIMIT]
        corr["ok"] = not missing and not bad
        if missing:
            corr["error"] = f"did not run: {missing}"
        if bad:
            corr["failed"] = bad
        del ref
    except Exception as exc:  # noqa: BLE001
        corr["ok"] = False
        corr["error"] = f"reference failed: {_err(exc)}"
    if not corr["ok"]:
        print("\n" + "!" * 78 + f"\n!!! CORRECTNESS FAILURE in case {name}: {corr}\n" + "!" * 78)
    res["correctness"] = corr

    base = res["methods"]
    for entry in base.values():
        if "ms" not in entry:
            continue
        for ref_m, key in (
            ("sdpa_flash", "speedup_vs_sdpa_flash"),
            ("sdpa_cudnn", "speedup_vs_cudnn"),
            ("sdpa_flash_loop", "speedup_vs_sdpa_flash_loop"),
        ):
            if "ms" in base.get(ref_m, {}):
                entry[key] = base[ref_m]["ms"] / entry["ms"]  # > 1: faster than the baseline
    outputs.clear()
    _empty_cache(torch)
    return res


def slipstream_methods(args: argparse.Namespace) -> list[str]:
    """['slipstream'] without --variants, else ['slipstream:<v>', ...] in the given order."""
    if not args.variants:
        return ["slipstream"]
    return [f"slipstream:{v}" for v in args.variant_list]


def autotune_info(w: dict, variant: str | None = None) -> dict:
    """Which config the autotuner picked (and the timings it saw) for this head_dim/variant."""
    try:
        from slipstream.kernels import flash_attn as fa

        variant = fa._resolve_variant(variant)
        tuner = fa._autotuned_kernel(w["q"].shape[2], variant)
        info: dict[str, Any] = {"best_config": str(getattr(tuner, "best_config", None))}
        timings = getattr(tuner, "configs_timings", None) or {}
        info["timings_ms"] = {
            str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()
        }
        info["cache"] = {str(k): str(v) for k, v in getattr(tuner, "cache", {}).items()}
        return info
    except Exception as exc:  # noqa: BLE001
        return {"error": _err(exc)}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_summary(results: dict) -> None:
    print("\n" + "=" * 104)
    print(f"{'case':34s} {'method':20s} {'ms':>9s} {'TFLOP/s':>8s} {'x flash':>8s} {'x cudnn':>8s}")
    print("-" * 104)
    for name, case in results["cases"].items():
        if "methods" not in case:
            print(f"{name:34s} ERROR {case.get('error')}")
            continue
        for m, e in case["methods"].items():
            if "ms" in e:
                xf = _fmt(e.get("speedup_vs_sdpa_flash"))
                xc = _fmt(e.get("speedup_vs_cudnn"))
                print(f"{name:34s} {m:20s} {e['ms']:9.3f} {e['tflops']:8.1f} {xf:>8s} {xc:>8s}")
            else:
                print(f"{name:34s} {m:20s} ERROR {e.get('error', '')[:60]}")
        corr = case.get("correctness", {})
        for m, err in corr.get("rel_err", {}).items():
            if not m.startswith("slipstream"):
                continue
            print(
                f"{'':34s} correctness {m} vs {corr.get('reference')}: rel err "
                f"{format(err, '.2e')} -> {'OK' if err <= REL_ERR_LIMIT else 'FAIL'}"
            )
        if not corr.get("ok"):
            print(f"{'':34s} correctness FAIL: {corr.get('error') or corr.get('failed')}")
    print("=" * 104)
    table = results.get("variant_table")
    if table:
        variants = results["variants"]
        ref = variants[0]
        print(
            f"\nkernel variants side by side (TFLOP/s; x{ref} = speedup vs {ref}; rel err vs fp32)"
        )
        head = f"{'case':34s}" + "".join(f" {v:>22s}" for v in variants) + f" {'best':>10s}"
        print(head)
        print("-" * len(head))
        for name, row in table.items():
            cells = []
            for v in variants:
                c = row["variants"].get(v, {})
                if "tflops" in c:
                    cells.append(
                        f" {c['tflops']:7.1f} x{c.get('speedup_vs_' + ref, float('nan')):4.2f} "
                        f"{c.get('rel_err', float('nan')):7.1e}"
                    )
                else:
                    cells.append(f" {'ERROR':>22s}")
            print(f"{name:34s}" + "".join(cells) + f" {str(row.get('best')):>10s}")
        print(f"{'geomean speedup vs ' + ref:34s}" + "".join(
            f" {results['variant_geomean'].get(v, float('nan')):22.3f}" for v in variants
        ))  # fmt: skip


def variant_table(results: dict, variants: list[str]) -> tuple[dict, dict]:
    """Per case: each variant's ms / TFLOP/s / speedup vs the first variant / rel err, and the
    fastest correct variant; plus the geometric-mean speedup of each variant over all cases."""
    ref = variants[0]
    table: dict[str, Any] = {}
    logs: dict[str, list[float]] = {v: [] for v in variants}
    for name, case in results["cases"].items():
        if "methods" not in case:
            continue
        errs = case.get("correctness", {}).get("rel_err", {})
        row: dict[str, Any] = {"variants": {}}
        ref_ms = case["methods"].get(f"slipstream:{ref}", {}).get("ms")
        for v in variants:
            e = case["methods"].get(f"slipstream:{v}", {})
            cell: dict[str, Any] = {}
            if "ms" in e:
                cell = {"ms": e["ms"], "tflops": e["tflops"]}
                if ref_ms:
                    cell["speedup_vs_" + ref] = ref_ms / e["ms"]
                    logs[v].append(math.log(ref_ms / e["ms"]))
                best_cfg = e.get("autotune", {}).get("best_config")
                if best_cfg:
                    cell["best_config"] = best_cfg
            else:
                cell = {"error": e.get("error", "not run")}
            if f"slipstream:{v}" in errs:
                cell["rel_err"] = errs[f"slipstream:{v}"]
                cell["ok"] = errs[f"slipstream:{v}"] <= REL_ERR_LIMIT
            row["variants"][v] = cell
        ok = [(c["ms"], v) for v, c in row["variants"].items() if "ms" in c and c.get("ok")]
        row["best"] = min(ok)[1] if ok else None
        table[name] = row
    geo = {v: math.exp(sum(x) / len(x)) for v, x in logs.items() if x}
    return table, geo


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [n for n, c in results["cases"].items() if "methods" in c]
    methods: list[str] = []  # slipstream variants first, then the baselines, in run order
    for c in cases:
        for m in results["cases"][c]["methods"]:
            if m not in methods:
                methods.append(m)
    fig, ax = plt.subplots(figsize=(max(8, 2.6 * len(cases)), 5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [results["cases"][c]["methods"].get(m, {}).get("tflops", 0.0) for c in cases]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cases))]
        bars = ax.bar(xs, vals, width, label=m)
        for b, val in zip(bars, vals, strict=True):
            if val > 0:
                ax.annotate(f"{val:.0f}", (b.get_x() + b.get_width() / 2, val), ha="center",
                            va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel("TFLOP/s (real tokens only)")
    ax.set_title(
        f"Attention forward, {results.get('device', '?')}, {results['config']['dtype']}, "
        f"Hq={results['config']['hq']} Hkv={results['config']['hkv']} D={results['config']['head_dim']}"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.quick:
        args.seqlen, args.items, args.max_tokens = 1024, 16, 8192
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton decorates the kernel

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("attention_bench: needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    import triton

    if args.variants:
        from slipstream.kernels import flash_attn as fa

        if args.variant_list == ["all"]:
            args.variant_list = list(fa.VARIANTS)
        unknown = [v for v in args.variant_list if v not in fa.VARIANTS]
        if unknown or not args.variant_list:
            print(f"attention_bench: unknown variants {unknown}; known: {fa.VARIANTS}",
                  file=sys.stderr)  # fmt: skip
            return 2
    cases_wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    mixed = mixed_lengths(args.seed, args.items, args.max_tokens)
    case_defs = {
        "a": (f"a_causal_single_{args.seqlen}", f"one causal {args.seqlen}-token sequence",
              [args.seqlen], True),
        "b": (f"b_causal_mixed_{len(mixed)}", f"packed mixed batch of {len(mixed)}, causal",
              mixed, True),
        "c": (f"c_full_single_{args.seqlen}", f"one bidirectional {args.seqlen}-token sequence",
              [args.seqlen], False),
        "d": (f"d_full_mixed_{len(mixed)}", f"packed mixed batch of {len(mixed)}, bidirectional",
              mixed, False),
    }  # fmt: skip
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "flops_formula": "causal 4*Hq*D*sum(L*(L+1)/2); bidirectional 4*Hq*D*sum(L^2)",
        "speedup_definition": "baseline_ms / method_ms (> 1 means faster than the baseline)",
        "cases": {},
    }
    print(f"device {results['device']}  torch {torch.__version__}  triton {triton.__version__}")
    ok = True
    try:
        for c in cases_wanted:
            if c not in case_defs:
                print(f"unknown case {c!r} (expected a, b, c or d)")
                continue
            name, desc, lens, causal = case_defs[c]
            try:
                res = run_case(torch, triton, name, desc, lens, causal, args)
            except Exception as exc:  # noqa: BLE001 - keep the other cases
                traceback.print_exc()
                res = {"description": desc, "error": _err(exc)}
            results["cases"][name] = res
            ok = ok and bool(res.get("correctness", {}).get("ok", False))
    finally:
        if args.variants:
            results["variants"] = args.variant_list
            results["variant_table"], results["variant_geomean"] = variant_table(
                results, args.variant_list
            )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
            print(f"wrote {args.json}")
        if args.plot:
            try:
                write_plot(results, args.plot)
                print(f"wrote {args.plot}")
            except Exception as exc:  # noqa: BLE001
                print(f"plot failed: {_err(exc)}")
        print_summary(results)
    if not ok:
        print("attention_bench: CORRECTNESS CHECK FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
