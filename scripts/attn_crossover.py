"""Where the Gluon sm90 kernel stops paying off: attention time by the batch's longest sequence (GPU).

    python scripts/attn_crossover.py --json OUT.json [--tokens 16384] [--rep 100]

For each cap L, a packed batch of about --tokens tokens whose sequence lengths are drawn
log-uniformly from [max(1, L // 8), L] (seeded), in the Qwen3-0.6B layout (16 q / 8 kv heads of
128, q/k/v column views of one qkv buffer) with the q RMSNorm + rotary prologue, causal: the
calls an embedding forward makes. Each batch runs through `flash_attn_varlen` with
SLIPSTREAM_FLASH_VARIANT = gqa_pack (Triton), sm90_ws (Gluon, one program per tile) and sm90_ws
with a persistent grid (SLIPSTREAM_SM90_CONFIG=2,3,1); triton.testing.do_bench medians, one
process; every output is compared with gqa_pack's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from attention_bench import attention_flops  # noqa: E402
from attn_sm90_sweep import _case, _with_q_prologue  # noqa: E402

from slipstream.kernels import flash_attn as fa  # noqa: E402

HQ, HKV, D = 16, 8, 128
METHODS = {
    "gqa_pack": {"SLIPSTREAM_FLASH_VARIANT": "gqa_pack"},
    "sm90_ws": {"SLIPSTREAM_FLASH_VARIANT": "sm90_ws", "SLIPSTREAM_SM90_CONFIG": "2,3,0"},
    "sm90_ws persistent": {
        "SLIPSTREAM_FLASH_VARIANT": "sm90_ws",
        "SLIPSTREAM_SM90_CONFIG": "2,3,1",
    },
}


def lengths(cap: int, tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lo = max(1, cap // 8)
    out: list[int] = []
    while sum(out) < tokens:
        out.append(min(cap, round(math.exp(rng.uniform(math.log(lo), math.log(cap))))))
    return out


def make_case(lens: list[int]) -> dict:
    """The sweep's case (q/k/v column views of one qkv buffer) with its q prologue."""
    return _with_q_prologue(_case(lens, HQ, HKV, D), D)


def run(c: dict, out: torch.Tensor) -> None:
    fa.flash_attn_varlen(c["q"], c["k"], c["v"], out, c["cu"], c["cu"], c["max"], c["max"],
                         causal=True, **c["extra"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--caps", default="16,32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--rep", type=float, default=100.0)
    args = ap.parse_args()
    rows = []
    for cap in (int(x) for x in args.caps.split(",")):
        c = make_case(lengths(cap, args.tokens, seed=cap))
        flops = attention_flops(c["lens"], HQ, D, True)
        ref = None
        base_ms = None
        for name, env in METHODS.items():
            os.environ.update(env)
            out = torch.full_like(c["q"], float("nan"))
            run(c, out)
            torch.cuda.synchronize()
            if ref is None:
                ref = out
            diff = (out.float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(lambda c=c, o=out: run(c, o), warmup=25, rep=args.rep)
            base_ms = base_ms or ms
            rows.append({
                "cap": cap, "seqs": len(c["lens"]), "tokens": sum(c["lens"]), "method": name,
                "ms": ms, "tflops": flops / ms / 1e9, "x_vs_gqa_pack": base_ms / ms,
                "max_abs_diff_vs_gqa_pack": diff, "nan": bool(torch.isnan(out).any()),
            })  # fmt: skip
            print(f"cap {cap:5d} ({len(c['lens']):5d} seqs) {name:20s} {ms * 1e3:9.1f} us "
                  f"{flops / ms / 1e9:7.1f} TFLOP/s x{base_ms / ms:.2f} diff {diff:.3g}",
                  flush=True)  # fmt: skip
            for key in env:
                os.environ.pop(key, None)
    write_json(args.json, tokens=args.tokens, rows=rows)


def write_json(path: Path, **fields) -> None:
    """The result file: the device and library versions, then ``fields``."""
    info = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, **fields,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
