"""``slipstream bench generate``: decode throughput and time to first token vs transformers.

For each batch size (default 1, 16, 64) every request gets a random ``--prompt-len``-token
prompt (default 512) and generates exactly ``--new-tokens`` tokens (default 256, greedy, EOS
ignored). All requests arrive at once. Measured in the same run:

* slipstream with decode CUDA graphs (when available: CUDA + flash backend),
* slipstream without them (``--skip-no-graph`` to skip),
* transformers' ``generate`` (same weights, dtype and device; ``--no-baseline`` to skip).

Reported per run: mean / max time to first token (TTFT), decode throughput (output tokens per
second after every request has its first token), and end-to-end output tokens per second.
Ratios are against transformers. The prefix cache is off (random prompts share nothing, and
repeated runs must not hit each other's cache).

Without ``--model`` a random-weight Qwen3-0.6B-shaped checkpoint is written to a temporary
folder (nothing is downloaded). transformers is imported only here.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("slipstream")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Qwen3 causal-LM folder (default: random preset)")
    p.add_argument("--preset", default="qwen3-0.6b", choices=["qwen3-0.6b", "qwen3-tiny"],
                   help="random checkpoint shape used when --model is not given")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention-backend", default=None, help="flash (CUDA default) or torch")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="default: sized automatically")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunked-prefill-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (best kept)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--skip-no-graph", action="store_true", help="skip the run without graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", default=None, help="also write the JSON to this file")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # Stay clear of special tokens at the top of small vocabularies.
    hi = max(2, min(vocab, 100_000) - 16)
    return [[rng.randrange(hi) for _ in range(length)] for _ in range(batch)]


def _run_slipstream(gen: Any, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    from slipstream.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    rids = [gen.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    n_out = 0
    while gen.has_unfinished():
        for o in gen.step():  # step() returns after the sampled ids reached the host
            now = time.perf_counter()
            first.setdefault(o.request_id, now)
            n_out += len(o.new_token_ids)
    t_end = time.perf_counter()
    ttfts = [first[r] - t0 for r in rids]
    t_all_first = max(first.values())
    decode_tokens = n_out - len(prompts)
    decode_s = t_end - t_all_first
    return {
        "ttft_ms_mean": 1e3 * statistics.fmean(ttfts),
        "ttft_ms_max": 1e3 * max(ttfts),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "output_tokens_per_s": n_out / (t_end - t0),
        "total_s": t_end - t0,
        "output_tokens": n_out,
    }


def _run_hf(model: Any, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(device)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(device)
        total = time.perf_counter() - t0
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    decode_s = total - ttft
    return {
        "ttft_ms_mean": 1e3 * ttft,  # one batched prefill: every request's first token at once
        "ttft_ms_max": 1e3 * ttft,
        "decode_tokens_per_s": (n_out - ids.shape[0]) / decode_s if decode_s > 0 else float("nan"),
        "output_tokens_per_s": n_out / total,
        "total_s": total,
        "output_tokens": n_out,
    }


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["output_tokens_per_s"])


def run(args: argparse.Namespace) -> int:
    import torch

    from slipstream.checkpoint import make_checkpoint
    from slipstream.engine.engine import resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    batch_sizes = [int(x) for x in str(args.batch_sizes).split(",") if x.strip()]
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="slipstream-bench-")
        logger.info("writing a random %s checkpoint to %s", args.preset, tmp.name)
        model_dir = make_checkpoint(args.preset, tmp.name, seed=args.seed, dtype=dtype)
    else:
        model_dir = Path(args.model)
    try:
        results = _bench(args, model_dir, device, dtype, batch_sizes)
    finally:
        if tmp is not None:
            tmp.cleanup()
    payload = {
        "command": "slipstream bench generate",
        "model": str(args.model or f"random {args.preset}"),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "dtype": dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "results": results,
    }
    _print_table(payload)
    if args.json:
        print(json.dumps(payload, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _bench(
    args: argparse.Namespace, model_dir: Path, device: str, dtype: str, batch_sizes: list[int]
) -> list[dict]:
    import torch

    from slipstream import Engine
    from slipstream.config import ModelConfig

    vocab = ModelConfig.from_hf(model_dir).vocab_size
    results: list[dict] = []
    hf_results: dict[int, dict] = {}
    if not args.no_baseline:
        # transformers first, then freed: the slipstream KV pool is sized from free memory.
        from transformers import AutoModelForCausalLM

        tdtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
        hf: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype)
        hf = hf.to(device).eval()
        _run_hf(hf, _prompts(1, 8, vocab, 1), 4, device)  # warm-up
        for b in batch_sizes:
            prompts = _prompts(b, args.prompt_len, vocab, args.seed + b)
            runs = [_run_hf(hf, prompts, args.new_tokens, device) for _ in range(args.repeats)]
            hf_results[b] = _best(runs)
            logger.info("transformers batch %d: %s", b, hf_results[b])
        del hf
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    engine = Engine(
        model_dir,
        device=device,
        dtype=dtype,
        attention_backend=args.attention_backend,
        max_batch_size=max(max(batch_sizes), 1),
        disable_prefix_cache=True,
        kv_cache_gb=args.kv_cache_gb,
        page_size=args.page_size,
        chunked_prefill_tokens=args.chunked_prefill_tokens,
    )
    gen = engine.generation_engine()
    has_graphs = gen.runner.graphs is not None
    modes = [("slipstream", True)] if has_graphs else []
    if not has_graphs or not args.skip_no_graph:
        modes.append(("slipstream-no-graph", False))
    # Warm-up: Triton compilation/autotuning, allocator growth.
    for _, graphs in modes:
        gen.set_cuda_graphs(graphs)
        _run_slipstream(gen, _prompts(2, min(args.prompt_len, 64), vocab, 7), 8, device)
    for b in batch_sizes:
        prompts = _prompts(b, args.prompt_len, vocab, args.seed + b)
        for name, graphs in modes:
            gen.set_cuda_graphs(graphs)
            runs = [_run_slipstream(gen, prompts, args.new_tokens, device)
                    for _ in range(args.repeats)]  # fmt: skip
            r = {"engine": name, "batch_size": b, "cuda_graphs": graphs, **_best(runs)}
            if b in hf_results:
                base = hf_results[b]
                r["decode_speedup_vs_transformers"] = (
                    r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                )
                r["ttft_ratio_vs_transformers"] = r["ttft_ms_mean"] / base["ttft_ms_mean"]
            results.append(r)
            logger.info("%s batch %d: %s", name, b, r)
        if b in hf_results:
            results.append({"engine": "transformers", "batch_size": b, "cuda_graphs": False,
                            **hf_results[b]})  # fmt: skip
    results.append({"engine": "stats", **gen.stats()})
    return results


def _print_table(payload: dict) -> None:
    rows = [r for r in payload["results"] if r.get("engine") != "stats"]
    print(
        f"\nslipstream bench generate: {payload['model']} on {payload['gpu'] or payload['device']}"
        f" ({payload['dtype']}), prompt {payload['prompt_len']} tokens, "
        f"{payload['new_tokens']} new tokens"
    )
    head = f"{'batch':>5}  {'engine':<20} {'TTFT mean ms':>12} {'TTFT max ms':>12} " \
           f"{'decode tok/s':>13} {'output tok/s':>13} {'decode x HF':>11}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["batch_size"], r["engine"])):
        ratio = r.get("decode_speedup_vs_transformers")
        print(
            f"{r['batch_size']:>5}  {r['engine']:<20} {r['ttft_ms_mean']:>12.1f} "
            f"{r['ttft_ms_max']:>12.1f} {r['decode_tokens_per_s']:>13.1f} "
            f"{r['output_tokens_per_s']:>13.1f} "
            + (f"{ratio:>10.2f}x" if ratio is not None else f"{'':>11}")
        )
