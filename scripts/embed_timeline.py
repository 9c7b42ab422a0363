"""Per-forward host vs device time of an embedding run, without the profiler.

    python scripts/embed_timeline.py --model DIR --workload mixed --items 400 \
        [--quantization fp8] [--json OUT]

The profiler slows the host path (every op goes through the dispatcher under it), so its idle
gaps overstate how host-bound a plain run is. This wraps ``ModelRunner.embed`` with CUDA events
and host clocks instead: for each forward, how long the host took to enqueue it and how long the
device took to run it. A forward whose enqueue time reaches its device time starved the GPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _gpu_workload import add_args, warm_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    engine, wl = warm_engine(args)
    seqs = wl.token_ids

    runner = engine.runner
    inner = runner.embed
    rows: list[dict] = []

    def timed(batch):  # type: ignore[no-untyped-def]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        start.record()
        out = inner(batch)
        end.record()
        h1 = time.perf_counter()
        rows.append(
            {"tokens": batch.num_tokens, "seqs": batch.num_seqs, "max_len": batch.max_seqlen,
             "host_t0": h0, "host_ms": (h1 - h0) * 1e3, "_ev": (start, end)}
        )  # fmt: skip
        return out

    runner.embed = timed  # type: ignore[method-assign]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.embed_token_ids(seqs, show_progress=False)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    runner.embed = inner  # type: ignore[method-assign]

    prev_end = None
    for r in rows:
        start, end = r.pop("_ev")
        r["device_ms"] = start.elapsed_time(end)
        # Device time from the previous forward's end to this one's start: the read-backs and
        # post-processing queued in between, plus any time the device sat idle waiting.
        r["between_ms"] = prev_end.elapsed_time(start) if prev_end is not None else 0.0
        r["host_t0"] = (r["host_t0"] - t0) * 1e3
        prev_end = end
    device_ms = sum(r["device_ms"] for r in rows)
    between_ms = sum(r["between_ms"] for r in rows)
    starved = [r for r in rows if r["host_ms"] >= 0.9 * r["device_ms"]]
    summary = {
        "workload": args.workload,
        "items": args.items,
        "quantization": args.quantization,
        "forwards": len(rows),
        "wall_ms": wall_ms,
        "forward_device_ms": device_ms,
        "between_forwards_ms": between_ms,
        "host_enqueue_ms": sum(r["host_ms"] for r in rows),
        "before_first_forward_ms": rows[0]["host_t0"] if rows else 0.0,
        "host_bound_forwards": len(starved),
        "rows": rows,
    }
    print(
        f"wall {wall_ms:.1f} ms, {len(rows)} forwards: device {device_ms:.1f} ms, between "
        f"forwards {between_ms:.1f} ms, host enqueue {summary['host_enqueue_ms']:.1f} ms, "
        f"before the first forward {summary['before_first_forward_ms']:.1f} ms; "
        f"{len(starved)} forwards host-bound (enqueue >= 90% of device time)"
    )
    print(f"{'tokens':>7} {'seqs':>5} {'max_len':>7} {'host_ms':>8} {'dev_ms':>8} {'between':>8}")
    for r in rows:
        print(
            f"{r['tokens']:7d} {r['seqs']:5d} {r['max_len']:7d} {r['host_ms']:8.2f} "
            f"{r['device_ms']:8.2f} {r['between_ms']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
