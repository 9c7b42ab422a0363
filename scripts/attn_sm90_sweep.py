"""A/B of the Gluon sm90 attention kernel's settings against the Triton `gqa_pack` kernel (GPU).

    python scripts/attn_sm90_sweep.py --json OUT.json [--configs 2,3,1 2,3,0]

Each config is SLIPSTREAM_SM90_CONFIG="K_STAGES,V_STAGES,PERSISTENT". Cases (bf16, 16 q / 8 kv heads of
128, the layout of Qwen3-0.6B's qkv projection: q/k/v are column views of one buffer):
one causal 7168-token sequence, the packed causal `mixed` batch of benchmarks/attention_bench.py
(seed 0, 64 items), and one bidirectional 7168-token sequence. Every timing is a
triton.testing.do_bench median in this process; every output is compared with gqa_pack's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from attention_bench import attention_flops, mixed_lengths  # noqa: E402

from slipstream.kernels import flash_attn as fa  # noqa: E402
from slipstream.kernels import flash_attn_sm90 as sm90  # noqa: E402


def _case(lens: list[int], hq: int, hkv: int, d: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    t = sum(lens)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return {
        "q": qkv[:, : hq * d].view(t, hq, d),
        "k": qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d),
        "v": qkv[:, (hq + hkv) * d :].view(t, hkv, d),
        "cu": torch.tensor(cu, dtype=torch.int32, device="cuda"),
        "max": max(lens),
        "lens": lens,
    }


def _with_q_prologue(c: dict, d: int) -> dict:
    """The same case with Qwen3's q RMSNorm + rotary applied in the kernel's Q load."""
    g = torch.Generator(device="cuda").manual_seed(1)
    pos = torch.cat([torch.arange(n, device="cuda") for n in c["lens"]])
    inv = 1.0 / (1_000_000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    ang = pos.float()[:, None] * inv[None, :]
    extra = {
        "q_norm_weight": 1.0 + 0.1 * torch.randn(d, device="cuda", generator=g).to(torch.bfloat16),
        "cos": ang.cos().to(torch.bfloat16),
        "sin": ang.sin().to(torch.bfloat16),
        "q_norm_eps": 1e-6,
    }
    return {**c, "extra": extra}


def _run(c: dict, out: torch.Tensor, causal: bool) -> None:
    fa.flash_attn_varlen(
        c["q"], c["k"], c["v"], out, c["cu"], c["cu"], c["max"], c["max"], causal=causal,
        **c.get("extra", {}),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=["2,3,1", "2,3,0"])
    ap.add_argument("--rep", type=float, default=200.0)
    ap.add_argument("--q-prologue", action="store_true", help="also the cases with q norm+rope")
    args = ap.parse_args()
    hq, hkv, d = 16, 8, 128
    cases = {
        "causal_single_7168": (_case([7168], hq, hkv, d), True),
        "causal_mixed": (_case(mixed_lengths(0, 64, 65536), hq, hkv, d), True),
        "full_single_7168": (_case([7168], hq, hkv, d), False),
    }
    if args.q_prologue:
        for name in ("causal_single_7168", "causal_mixed"):
            cases[name + "_qrope"] = (_with_q_prologue(cases[name][0], d), True)
    rows = []
    for name, (c, causal) in cases.items():
        flops = attention_flops(c["lens"], hq, d, causal)
        assert (
            sm90.supported(c["q"], c["k"], c["v"], torch.empty_like(c["q"]), c["cu"], c["cu"])
            is None
        )
        ref = torch.empty_like(c["q"])
        os.environ["SLIPSTREAM_FLASH_VARIANT"] = "gqa_pack"
        _run(c, ref, causal)
        ms = triton.testing.do_bench(
            lambda c=c, o=ref, k=causal: _run(c, o, k), warmup=50, rep=args.rep
        )
        base = flops / ms / 1e9
        rows.append({"case": name, "method": "gqa_pack", "ms": ms, "tflops": base, "x": 1.0})
        print(f"{name:22s} gqa_pack        {ms:8.3f} ms {base:7.1f} TFLOP/s", flush=True)
        os.environ["SLIPSTREAM_FLASH_VARIANT"] = "sm90_ws"
        for cfg in args.configs:
            os.environ["SLIPSTREAM_SM90_CONFIG"] = cfg
            out = torch.full_like(c["q"], float("nan"))
            _run(c, out, causal)
            torch.cuda.synchronize()
            diff = (out.float() - ref.float()).abs()
            bad = bool(torch.isnan(out).any()) or bool(
                (diff > 2e-2 + 2e-2 * ref.float().abs()).any()
            )
            ms = triton.testing.do_bench(
                lambda c=c, o=out, k=causal: _run(c, o, k), warmup=50, rep=args.rep
            )
            tf = flops / ms / 1e9
            rows.append({
                "case": name, "method": f"sm90_ws[{cfg}]", "ms": ms, "tflops": tf, "x": tf / base,
                "max_abs_diff_vs_gqa_pack": diff.max().item(), "mismatch": bad,
            })  # fmt: skip
            print(
                f"{name:22s} sm90_ws[{cfg}]  {ms:8.3f} ms {tf:7.1f} TFLOP/s x{tf / base:.3f}"
                f" maxdiff {diff.max().item():.3g}{' MISMATCH' if bad else ''}",
                flush=True,
            )
        os.environ.pop("SLIPSTREAM_SM90_CONFIG", None)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "hq": hq,
        "hkv": hkv,
        "head_dim": d,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
