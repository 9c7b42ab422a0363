"""``slipstream bench embed``: embedding throughput against a baseline, in one process.

Both systems embed the same seeded token-id workload (no tokenization) on the same device
and dtype. Each is warmed up with one full pass of the workload (the baseline at each of its
batch sizes: every padded shape it will see gets its kernels chosen and its memory cached
before the clock starts, as slipstream's graphs and autotuning are), then timed over
``--repeats`` full passes with the device synchronised around each pass; the median counts.
Reported: items/s, tokens/s, model FLOP utilisation (FLOPs from the config, over a measured
dense-GEMM peak), the speedup over the best baseline batch size, and the minimum cosine
between the two systems' vectors.

``time_breakdown`` is an instrumented pass over the ``short`` workload (synchronising between
stages, so its total is a little above the real time): scheduling + packing, host-to-device,
model forward, pooling + normalisation, device-to-host, scatter into the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream.bench.flops import embed_flops, measure_peak_tflops
from slipstream.bench.workloads import NAMED_WORKLOADS, Workload, make_workload
from slipstream.cli import add_cuda_graph_arg, add_quantization_args
from slipstream.errors import ConfigError

logger = logging.getLogger("slipstream.bench")

DEFAULT_BASELINE_BATCH_SIZES = (8, 32)
BREAKDOWN_MAX_ITEMS = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    p.add_argument(
        "--workload",
        default="mixed",
        help=f"{', '.join(NAMED_WORKLOADS)}, or a JSON file holding a list of lengths",
    )
    p.add_argument("--items", type=int, default=None, help="number of inputs (default 1000)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    add_quantization_args(p)
    add_cuda_graph_arg(p)
    p.add_argument("--attention-backend", default=None, help="flash or torch")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-input-tokens", type=int, default=None, help="length cap")
    p.add_argument("--baseline", default="hf", choices=["hf", "none"])
    p.add_argument(
        "--baseline-batch-sizes",
        default=",".join(str(b) for b in DEFAULT_BASELINE_BATCH_SIZES),
        help="comma-separated; the fastest one counts",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: measured with a dense bf16 8192^3 GEMM on CUDA)",
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip the time breakdown")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG chart")


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--baseline-batch-sizes must be integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--baseline-batch-sizes must be positive integers, got {text!r}")
    return sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def time_passes(fn: Any, device: torch.device, repeats: int) -> tuple[list[float], Any]:
    """Seconds of ``repeats`` synchronised calls, and the last call's result."""
    times: list[float] = []
    result = None
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, result


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float(np.min(num / np.maximum(den, 1e-300)))


# ---------------------------------------------------------------------------------------
# Time breakdown
# ---------------------------------------------------------------------------------------


def _device_tensors(engine: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The runner's own host-to-device step when it has one, else the same steps here."""
    runner = engine.runner
    fn = getattr(runner, "_device_tensors", None)
    if fn is not None:
        return fn(batch)
    from slipstream.attention.base import AttentionMetadata

    dev = engine.config.torch_device
    ids = torch.as_tensor(batch.token_ids, dtype=torch.int64).to(dev, non_blocking=True)
    pos = torch.as_tensor(batch.positions, dtype=torch.int64).to(dev, non_blocking=True)
    meta = AttentionMetadata.from_seq_lens(batch.seq_lens, engine.model_config.causal, dev)
    return ids, pos, meta


def measure_time_breakdown(engine: Any, seqs: list[list[int]]) -> dict[str, Any]:
    """One instrumented embedding pass (normalised vectors), synchronising between stages."""
    from slipstream.engine.scheduler import plan_embed_batches
    from slipstream.layers.pooler import pool, postprocess

    device = engine.config.torch_device
    mode = engine.model_config.pooling.mode
    pooled_forward = getattr(engine.runner, "pooled_forward", None)
    stages = dict.fromkeys(
        (
            "schedule_pack",
            "host_to_device",
            "forward",
            "pool_postprocess",
            "device_to_host",
            "scatter",
        ),
        0.0,
    )
    result = np.empty((len(seqs), engine.hidden_size), dtype=np.float32)
    # With embedding CUDA graphs the forward is a replay, as in the timed runs; a first,
    # unmeasured pass captures the buckets this workload needs.
    graphs = getattr(engine.runner, "embed_graphs", None)
    with torch.inference_mode():
        for measured in [False, True] if graphs is not None else [True]:
            stages = dict.fromkeys(stages, 0.0)
            _sync(device)
            t_start = time.perf_counter()
            batches = plan_embed_batches(
                seqs, engine.config.max_batch_tokens, engine.config.max_batch_size
            )
            t1 = time.perf_counter()
            stages["schedule_pack"] += t1 - t_start
            for batch in batches:
                t0 = time.perf_counter()
                # The graph path copies the batch into its static buffers itself: that
                # host-to-device copy is counted in `forward`.
                pooled = graphs.run(batch) if graphs is not None else None
                t1 = t0
                if pooled is None:
                    ids, pos, meta = _device_tensors(engine, batch)
                    _sync(device)
                    t1 = time.perf_counter()
                    if pooled_forward is not None:  # the engine's forward (last-layer pruning)
                        pooled = pooled_forward(ids, pos, meta)
                    else:
                        pooled = pool(engine.runner.model(ids, pos, meta), meta.cu_seqlens_q, mode)
                _sync(device)
                t2 = time.perf_counter()
                vecs = postprocess(pooled, True, None)
                _sync(device)
                t3 = time.perf_counter()
                host = vecs.cpu().numpy()
                t4 = time.perf_counter()
                result[list(batch.item_ids)] = host
                t5 = time.perf_counter()
                stages["host_to_device"] += t1 - t0
                stages["forward"] += t2 - t1
                stages["pool_postprocess"] += t3 - t2
                stages["device_to_host"] += t4 - t3
                stages["scatter"] += t5 - t4
            total = time.perf_counter() - t_start
            if not measured:
                continue
    return {
        "items": len(seqs),
        "tokens": sum(len(s) for s in seqs),
        "forwards": len(batches),
        "total_ms": round(total * 1e3, 4),
        "stages_ms": {k: round(v * 1e3, 4) for k, v in stages.items()},
        "stages_share": {k: round(v / total, 4) if total else 0.0 for k, v in stages.items()},
        "note": "instrumented pass: the device is synchronised after every stage",
        "forward_path": "cuda_graph" if graphs is not None else "eager",
    }


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def _throughput(wl: Workload, seconds: float, flops: int, peak_tflops: float) -> dict[str, Any]:
    return {
        "items_per_s": wl.items / seconds,
        "tokens_per_s": wl.total_tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": (flops / seconds / 1e12) / peak_tflops if peak_tflops > 0 else None,
    }


def run_baseline(
    engine: Any,
    wl: Workload,
    ref: np.ndarray | None,
    batch_sizes: list[int],
    repeats: int,
    flops: int,
    peak_tflops: float,
) -> tuple[list[dict[str, Any]], str]:
    from slipstream.bench.baseline_hf import HFBaseline

    device = engine.config.torch_device
    base = HFBaseline(engine.model_dir, device, engine.config.dtype, engine.model_config)
    results: list[dict[str, Any]] = []
    try:
        for bs in batch_sizes:
            entry: dict[str, Any] = {"batch_size": bs}
            try:
                with torch.inference_mode():
                    base.embed(wl.token_ids, bs)  # warm-up: a full pass, as for slipstream
                    _sync(device)
                    times, vecs = time_passes(
                        lambda bs=bs: base.embed(wl.token_ids, bs), device, repeats
                    )
            except torch.cuda.OutOfMemoryError:
                entry["error"] = "out of memory"
                results.append(entry)
                torch.cuda.empty_cache()
                logger.warning("baseline batch size %d ran out of memory", bs)
                continue
            seconds = statistics.median(times)
            entry.update(_throughput(wl, seconds, flops, peak_tflops))
            entry["seconds"] = seconds
            entry["seconds_runs"] = times
            entry["cosine_min"] = cosine_min(ref, vecs) if ref is not None else None
            results.append(entry)
    finally:
        version = base.transformers_version
        base.close()
    return results, version


def run_embed_bench(args: argparse.Namespace) -> dict[str, Any]:
    from slipstream.cli import engine_from_args

    repeats = max(1, int(args.repeats))
    batch_sizes = _parse_batch_sizes(args.baseline_batch_sizes)
    engine = engine_from_args(args)
    cfg = engine.model_config
    device = engine.config.torch_device
    items = args.items
    if items is None and args.workload in NAMED_WORKLOADS:
        items = 1000
    wl = make_workload(
        args.workload,
        items,
        cfg.vocab_size,
        max_len=engine.max_input_tokens,
        seed=args.seed,
        exclude=cfg.eos_token_ids,
    )
    if wl.capped_items:
        logger.warning(
            "%d of %d items were longer than max_input_tokens=%d and were capped",
            wl.capped_items,
            wl.items,
            engine.max_input_tokens,
        )
    flops = embed_flops(cfg, wl.lengths)

    if args.peak_tflops is not None:
        peak, peak_measured, peak_dtype = float(args.peak_tflops), None, "given"
    else:
        peak_dtype = "bfloat16" if device.type == "cuda" else "float32"
        peak_measured = measure_peak_tflops(
            device, torch.bfloat16 if device.type == "cuda" else torch.float32
        )
        peak = peak_measured

    # slipstream: one full warm-up pass, then timed passes
    def ss_pass() -> np.ndarray:
        return engine.embed_token_ids(wl.token_ids, normalize=True, show_progress=False)

    ss_pass()
    _sync(device)
    times, ss_vecs = time_passes(ss_pass, device, repeats)
    seconds = statistics.median(times)
    ss = _throughput(wl, seconds, flops, peak)

    breakdown = None
    if not args.no_breakdown:
        short = make_workload(
            "short",
            min(wl.items, BREAKDOWN_MAX_ITEMS),
            cfg.vocab_size,
            max_len=engine.max_input_tokens,
            seed=args.seed,
            exclude=cfg.eos_token_ids,
        )
        measure_time_breakdown(engine, short.token_ids)  # warm-up of the short shapes
        breakdown = {"workload": "short", **measure_time_breakdown(engine, short.token_ids)}

    baseline_results: list[dict[str, Any]] = []
    transformers_version = None
    best: dict[str, Any] | None = None
    if args.baseline == "hf":
        baseline_results, transformers_version = run_baseline(
            engine, wl, ss_vecs, batch_sizes, repeats, flops, peak
        )
        ok = [r for r in baseline_results if "error" not in r]
        if ok:
            best = max(ok, key=lambda r: r["items_per_s"])

    res: dict[str, Any] = {
        "model": str(engine.model_dir),
        "arch": cfg.arch,
        "device": device.type,
        "device_name": _device_name(device),
        "dtype": str(engine.config.dtype).removeprefix("torch."),
        "quantization": engine.config.quantization,
        "attention_backend": engine.config.attention_backend,
        "cuda_graphs": getattr(engine.runner, "embed_graphs", None) is not None,
        "max_batch_tokens": engine.config.max_batch_tokens,
        "max_input_tokens": engine.max_input_tokens,
        **wl.summary(),
        "total_flops": flops,
        "peak_tflops": peak,
        "peak_tflops_measured": peak_measured,
        "peak_dtype": peak_dtype,
        "repeats": repeats,
        "seconds": seconds,
        "seconds_runs": times,
        "items_per_s": ss["items_per_s"],
        "tokens_per_s": ss["tokens_per_s"],
        "tflops": ss["tflops"],
        "mfu": ss["mfu"],
        "baseline": args.baseline,
        "baseline_results": baseline_results,
        "baseline_batch_size": best["batch_size"] if best else None,
        "baseline_seconds": best["seconds"] if best else None,
        "baseline_items_per_s": best["items_per_s"] if best else None,
        "baseline_tokens_per_s": best["tokens_per_s"] if best else None,
        "baseline_mfu": best["mfu"] if best else None,
        "speedup": (ss["items_per_s"] / best["items_per_s"]) if best else None,
        "cosine_min": best["cosine_min"] if best else None,
        "time_breakdown": breakdown,
        "torch_version": torch.__version__,
        "transformers_version": transformers_version,
        "command": command_line(args),
    }
    if wl.capped_items:
        res["note"] = (
            f"{wl.capped_items} of {wl.items} items were capped at max_input_tokens="
            f"{engine.max_input_tokens}"
        )
    return res


def command_line(args: argparse.Namespace) -> str:
    parts = ["slipstream", "bench", "embed"]
    for key in (
        "model",
        "workload",
        "items",
        "device",
        "dtype",
        "quantization",
        "attention_backend",
        "max_batch_tokens",
        "max_input_tokens",
        "baseline",
        "baseline_batch_sizes",
        "repeats",
        "seed",
        "peak_tflops",
        "json",
        "plot",
    ):
        val = getattr(args, key, None)
        if val is not None:
            parts += [f"--{key.replace('_', '-')}", str(val)]
    if getattr(args, "no_breakdown", False):
        parts.append("--no-breakdown")
    return " ".join(parts)


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"embedding throughput: {res['model']}",
        f"  workload {res['workload']}: {res['items']} items, {res['total_tokens']} tokens "
        f"(length min/median/max {res['min_len']}/{res['median_len']}/{res['max_len']})"
        + (f", {res['capped_items']} capped at {res['length_cap']}" if res["capped_items"] else ""),
        f"  device {res['device']} ({res['device_name']}), dtype {res['dtype']}"
        + (f", quantization {res['quantization']}" if res["quantization"] else "")
        + f", backend {res['attention_backend']}, peak {res['peak_tflops']:.3g} TFLOP/s "
        f"({res['peak_dtype']})",
        "",
        f"{'system':<22} {'items/s':>10} {'tokens/s':>12} {'MFU':>8} {'seconds':>9} {'cos min':>9}",
        f"{'slipstream':<22} {res['items_per_s']:>10.1f} {res['tokens_per_s']:>12.0f} "
        f"{_fmt_pct(res['mfu']):>8} {res['seconds']:>9.4f} {'':>9}",
    ]
    for r in res["baseline_results"]:
        label = f"hf sdpa (batch {r['batch_size']})"
        if "error" in r:
            lines.append(f"{label:<22} {r['error']}")
            continue
        cos = "-" if r["cosine_min"] is None else f"{r['cosine_min']:.6f}"
        lines.append(
            f"{label:<22} {r['items_per_s']:>10.1f} {r['tokens_per_s']:>12.0f} "
            f"{_fmt_pct(r['mfu']):>8} {r['seconds']:>9.4f} {cos:>9}"
        )
    if res["speedup"] is not None:
        lines.append("")
        lines.append(
            f"speedup {res['speedup']:.2f}x over the best baseline (batch "
            f"{res['baseline_batch_size']}); min cosine {res['cosine_min']:.6f}"
        )
    bd = res.get("time_breakdown")
    if bd:
        parts = ", ".join(
            f"{k} {v:.2f} ms ({100 * bd['stages_share'][k]:.0f}%)"
            for k, v in bd["stages_ms"].items()
        )
        lines.append(
            f"time breakdown ({bd['workload']}, {bd['items']} items, {bd['forwards']} "
            f"forwards, {bd['total_ms']:.2f} ms): {parts}"
        )
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    return "\n".join(lines)


def write_plot(res: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["slipstream"]
    ips = [res["items_per_s"]]
    mfu = [100 * (res["mfu"] or 0.0)]
    for r in res["baseline_results"]:
        if "error" in r:
            continue
        labels.append(f"HF sdpa\nbatch {r['batch_size']}")
        ips.append(r["items_per_s"])
        mfu.append(100 * (r["mfu"] or 0.0))
    colors = ["#1f77b4"] + ["#ff7f0e"] * (len(labels) - 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    bars = ax1.bar(labels, ips, color=colors)
    ax1.set_ylabel("items / s")
    ax1.set_title("throughput")
    for bar, v in zip(bars, ips, strict=True):
        ax1.annotate(
            f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    if res.get("speedup") is not None:
        ax1.text(
            0.98,
            0.95,
            f"speedup {res['speedup']:.2f}x",
            transform=ax1.transAxes,
            ha="right",
            va="top",
            fontsize=11,
            fontweight="bold",
        )
    ax1.set_ylim(0, max(ips) * 1.2 if ips else 1)
    bars2 = ax2.bar(labels, mfu, color=colors)
    ax2.set_ylabel("model FLOP utilisation (%)")
    ax2.set_title(f"MFU (peak {res['peak_tflops']:.3g} TFLOP/s)")
    for bar, v in zip(bars2, mfu, strict=True):
        ax2.annotate(
            f"{v:.1f}%",
            (bar.get_x() + bar.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax2.set_ylim(0, max(mfu) * 1.2 if max(mfu) > 0 else 1)
    quant = f" {res['quantization']}" if res["quantization"] else ""
    fig.suptitle(
        f"{Path(res['model']).name}: {res['workload']} x{res['items']} on {res['device_name']} "
        f"({res['dtype']}{quant})",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from slipstream.bench.profile_copies import use_triton_interpreter_on_cpu

    use_triton_interpreter_on_cpu(args.device)
    res = run_embed_bench(args)
    print(format_table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0
