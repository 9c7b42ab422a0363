"""FP8 A/B on one GPU, in one process: accuracy (cosine to slipstream bf16) and wall time of
`Engine.embed_token_ids` on a workload, for several fp8 settings.

    python scripts/fp8_ab.py --model DIR [--workload mixed --items 400] [--json OUT]

Variants: leading layers kept in bf16 (`fp8_skip_layers`), fast accumulation in the fp8 GEMM
(SLIPSTREAM_FP8_FAST_ACCUM), the fused norm/activation quantisation hand-over (`takes_fp8_rows`)
on or off, 65,536-token forwards, and q's norm + rotary in the attention kernel
(SLIPSTREAM_FLASH_QROPE, on by default) or in the separate qk kernel, and CUDA graphs for the
embedding forwards (on by default) or eager forwards, the residual add in the o_proj/down_proj
GEMM epilogue (SLIPSTREAM_RESIDUAL_GEMM, on by default) or in the norm kernels. The bf16 engine runs first and gives the reference
vectors; each engine is freed before the next is built.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import numpy as np
import torch

VARIANTS = [
    # name, engine kwargs, env, hand-over
    ("bf16", {}, {}, True),
    ("fp8 skip0", {"quantization": "fp8", "fp8_skip_layers": 0}, {}, True),
    ("fp8 skip0 no-handover", {"quantization": "fp8", "fp8_skip_layers": 0}, {}, False),
    ("fp8 skip0 exact-accum", {"quantization": "fp8", "fp8_skip_layers": 0},
     {"SLIPSTREAM_FP8_FAST_ACCUM": "0"}, True),
    ("fp8 skip1", {"quantization": "fp8", "fp8_skip_layers": 1}, {}, True),
    ("fp8 skip2", {"quantization": "fp8", "fp8_skip_layers": 2}, {}, True),
    ("fp8 skip2 exact-accum", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_FP8_FAST_ACCUM": "0"}, True),
    ("fp8 skip3", {"quantization": "fp8", "fp8_skip_layers": 3}, {}, True),
    ("fp8 skip2 65k", {"quantization": "fp8", "fp8_skip_layers": 2, "max_batch_tokens": 65536},
     {}, True),
    ("bf16 65k", {"max_batch_tokens": 65536}, {}, True),
    # q norm + rotary in the attention kernel's Q load (default) vs in the qk kernel
    ("bf16 no-qrope", {}, {"SLIPSTREAM_FLASH_QROPE": "0"}, True),
    ("fp8 skip2 no-qrope", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_FLASH_QROPE": "0"}, True),
    # embedding forwards eagerly instead of as CUDA-graph replays
    ("bf16 no-graphs", {"disable_cuda_graph": True}, {}, True),
    ("fp8 skip2 no-graphs", {"quantization": "fp8", "fp8_skip_layers": 2,
                             "disable_cuda_graph": True}, {}, True),
    # the residual add in o_proj's / down_proj's GEMM epilogue (default) vs add+norm kernels
    ("bf16 no-resgemm", {}, {"SLIPSTREAM_RESIDUAL_GEMM": "0"}, True),
    ("fp8 skip2 no-resgemm", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_RESIDUAL_GEMM": "0"}, True),
    # attention kernel: the Triton gqa_pack kernel vs the Gluon sm90 producer/consumer kernel
    ("bf16 gqa_pack", {}, {"SLIPSTREAM_FLASH_VARIANT": "gqa_pack"}, True),
    ("bf16 sm90", {}, {"SLIPSTREAM_FLASH_VARIANT": "sm90_ws"}, True),
    ("fp8 skip2 gqa_pack", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_FLASH_VARIANT": "gqa_pack"}, True),
    ("fp8 skip2 sm90", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_FLASH_VARIANT": "sm90_ws"}, True),
    # the sm90 kernel on a persistent grid (default) vs one program per tile
    ("bf16 sm90 per-tile", {}, {"SLIPSTREAM_FLASH_VARIANT": "sm90_ws",
                                "SLIPSTREAM_SM90_CONFIG": "2,3,0"}, True),
    ("fp8 skip2 sm90 per-tile", {"quantization": "fp8", "fp8_skip_layers": 2},
     {"SLIPSTREAM_FLASH_VARIANT": "sm90_ws", "SLIPSTREAM_SM90_CONFIG": "2,3,0"}, True),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from slipstream import Engine
    from slipstream.bench.workloads import make_workload
    from slipstream.layers.fp8 import Fp8Linear

    only = set(args.only.split(",")) if args.only else None
    ref = None
    rows = []
    for name, kwargs, env, handover in VARIANTS:
        if only and name not in only and name != "bf16":
            continue
        # The variant's environment holds for the whole run (some switches are read per call).
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        engine = Engine(args.model, device="cuda", dtype="bfloat16", **kwargs)
        if not handover:
            for m in engine.runner.model.modules():
                if isinstance(m, Fp8Linear):
                    m.takes_fp8_rows = False
        wl = make_workload(args.workload, args.items, engine.model_config.vocab_size,
                           max_len=engine.max_input_tokens, seed=0)  # fmt: skip
        seqs = wl.token_ids
        vecs = engine.embed_token_ids(seqs, show_progress=False)  # warm-up (autotune, checks)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            vecs = engine.embed_token_ids(seqs, show_progress=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if ref is None:
            ref = vecs
        cos = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
        wall = statistics.median(times)
        row = {
            "variant": name,
            "wall_s": wall,
            "items_per_s": len(seqs) / wall,
            "tokens_per_s": wl.total_tokens / wall,
            "cos_min_vs_bf16": float(cos.min()),
            "cos_mean_vs_bf16": float(cos.mean()),
            "fp8_layers": sum(isinstance(m, Fp8Linear) for m in engine.runner.model.modules()),
        }
        rows.append(row)
        print(f"{name:26s} {row['items_per_s']:8.1f} items/s  wall {wall * 1e3:7.1f} ms  "
              f"cos min {row['cos_min_vs_bf16']:.4f} mean {row['cos_mean_vs_bf16']:.5f}  "
              f"fp8 linears {row['fp8_layers']}", flush=True)  # fmt: skip
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "items": args.items,
                       "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
