"""Kernel-time breakdown of slipstream forwards on the GPU (for docs/performance.md).

    python scripts/kernel_breakdown.py --model DIR --workload mixed --items 400 [--quantization fp8]
        [--json OUT]

Runs the workload once to warm up, then once under torch.profiler, and groups device time by
kernel category (GEMM, attention, norms, rotary, activation, fp8 quantisation, copies, other).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from _gpu_workload import add_args, warm_engine

CATEGORIES = [
    ("attention", re.compile(r"flash|attn|_fwd_kernel", re.I)),
    ("gemm", re.compile(r"gemm|sm90_xmma|cutlass|nvjet|matmul|sgemm|hgemm|s16816|wgmma", re.I)),
    ("norm", re.compile(r"rms|norm", re.I)),  # incl. the RMSNorms that quantise to fp8
    ("rotary", re.compile(r"rope|rotary", re.I)),
    ("activation", re.compile(r"silu|gelu|act", re.I)),  # incl. SiLU-and-mul + fp8 quant
    ("fp8_quant", re.compile(r"quant", re.I)),
    ("embedding_lookup", re.compile(r"index|gather|embedding", re.I)),
    ("copy", re.compile(r"copy|memcpy|cat", re.I)),
]


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    engine, wl = warm_engine(args)
    seqs = wl.token_ids
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.embed_token_ids(seqs, show_progress=False)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    wall = sorted(walls)[1]
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        engine.embed_token_ids(seqs, show_progress=False)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for evt in prof.key_averages():
        dev_type = str(getattr(evt, "device_type", ""))
        t = float(
            getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
        )
        if t <= 0 or "CPU" in dev_type and not t:
            continue
        if evt.key.startswith(("aten::", "slipstream::", "cuda", "ProfilerStep")):
            continue  # CPU-side ops carry their children's device time; keep kernels only
        if evt.key == "Command Buffer Full":
            continue  # the host waiting for room in the launch queue: not device work
        per_kernel[evt.key] = per_kernel.get(evt.key, 0.0) + t
    total = sum(per_kernel.values())
    cats: dict[str, float] = {}
    for k, t in per_kernel.items():
        cats[category(k)] = cats.get(category(k), 0.0) + t
    print(
        f"workload {args.workload} x{args.items}, quantization {args.quantization}: "
        f"wall {wall * 1e3:.1f} ms (runs {[round(w * 1e3, 1) for w in walls]}), "
        f"kernel time {total / 1e3:.1f} ms, max_batch_tokens {args.max_batch_tokens}"
    )
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"  {c:<18} {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%")
    print("top kernels:")
    top = sorted(per_kernel.items(), key=lambda x: -x[1])[:15]
    for k, t in top:
        print(f"  {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%  [{category(k)}] {k[:110]}")
    # Idle device time: gaps between consecutive kernels (one stream), by size. Small gaps are
    # the launch cadence; large ones mean the GPU waited for the host.
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > 0
    )
    buckets = {"<5us": 0.0, "5-50us": 0.0, "50-500us": 0.0, ">=500us": 0.0}
    counts = dict.fromkeys(buckets, 0)
    end = spans[0][1] if spans else 0
    for a, b in spans[1:]:
        gap = a - end
        if gap > 0:
            name = (
                "<5us"
                if gap < 5
                else "5-50us"
                if gap < 50
                else "50-500us"
                if gap < 500
                else ">=500us"
            )
            buckets[name] += gap
            counts[name] += 1
        end = max(end, b)
    first_to_last = (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0
    print(f"device idle between kernels (first kernel to last: {first_to_last:.1f} ms):")
    for name, t in buckets.items():
        print(f"  {name:<9} {t / 1e3:8.2f} ms in {counts[name]} gaps")
    # Host side: self CPU time of the ops and Python-level regions (under the profiler, which
    # adds its own overhead per op; compare shares, not absolute values).
    host = sorted(
        ((e.key, float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()),
        key=lambda x: -x[1],
    )[:15]
    print("top host (self CPU) ops under the profiler:")
    for k, t, n in host:
        print(f"  {t / 1e3:9.2f} ms  x{n:<6d} {k[:100]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "workload": args.workload,
                    "items": args.items,
                    "quantization": args.quantization,
                    "wall_ms": wall * 1e3,
                    "kernel_ms": total / 1e3,
                    "categories_ms": {c: t / 1e3 for c, t in cats.items()},
                    "top_kernels_ms": [[k, t / 1e3] for k, t in top],
                    "top_host_self_cpu_ms": [[k, t / 1e3, n] for k, t, n in host],
                    "idle_gaps_ms": {k: v / 1e3 for k, v in buckets.items()},
                    "idle_gap_counts": counts,
                    "first_to_last_kernel_ms": first_to_last,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
