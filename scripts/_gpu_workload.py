"""Shared set-up of the GPU analysis scripts (kernel_breakdown, embed_timeline, host_profile):
the same engine options, the same seeded workload, and one warm-up pass before anything is
measured (autotuning, first-use kernel checks, CUDA-graph captures)."""

from __future__ import annotations

import argparse
from typing import Any

import torch


def add_args(ap: argparse.ArgumentParser, workload: str = "mixed", items: int = 400) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default=workload)
    ap.add_argument("--items", type=int, default=items)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--fp8-skip-layers", type=int, default=None)


def warm_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """(Engine on CUDA in bf16, the seed-0 workload) after one unmeasured pass over it."""
    from slipstream import Engine
    from slipstream.bench.workloads import make_workload

    engine = Engine(
        args.model,
        device="cuda",
        dtype="bfloat16",
        quantization=args.quantization,
        max_batch_tokens=args.max_batch_tokens,
        **({} if args.fp8_skip_layers is None else {"fp8_skip_layers": args.fp8_skip_layers}),
    )
    wl = make_workload(
        args.workload,
        args.items,
        vocab_size=engine.model_config.vocab_size,
        max_len=engine.max_input_tokens,
        seed=0,
    )
    engine.embed_token_ids(wl.token_ids, show_progress=False)
    torch.cuda.synchronize()
    return engine, wl
