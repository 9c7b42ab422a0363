"""A/B of the Gluon sm90 attention kernel with QK^T in fp8 against the same kernel in bf16 (GPU).

    python scripts/attn_qk8_ab.py --json OUT.json [--configs 2,3,0 3,3,0] [--rep 200]

The calls the Qwen3 embedding path makes: 16 q / 8 kv heads of 128, q raw from the qkv
projection with its RMSNorm + rotary applied in the kernel's Q load, k already normed and
rotated. The fp8 build reads k in e4m3 (rounded once here, outside the timing, under the static
scale the model uses: max|k_norm weight| * sqrt(128) / 448) and rounds each Q tile to e4m3 under
the matching q scale. Cases: one causal 7168-token sequence and the packed causal `mixed` batch
of benchmarks/attention_bench.py (seed 0, 64 items). Timings are triton.testing.do_bench medians
in one process; each output is compared with the bf16 kernel's and with a float64 reference of
the bf16 inputs (on the sequences up to 2048 tokens, to bound the reference's cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from attention_bench import attention_flops, mixed_lengths  # noqa: E402

from slipstream.kernels import flash_attn_sm90 as sm90  # noqa: E402
from slipstream.kernels import fused as F  # noqa: E402
from slipstream.layers.rotary import RotaryEmbedding  # noqa: E402

E4M3 = torch.float8_e4m3fn
HQ, HKV, D = 16, 8, 128


def static_scale(norm_weight: torch.Tensor) -> float:
    """|x| <= max|w| * sqrt(D) for x = RMSNorm(.) * w, rotated or not: that bound maps to 448."""
    return float(norm_weight.float().abs().max()) * math.sqrt(norm_weight.shape[0]) * 1.01 / 448.0


def make_case(lens: list[int]) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    t = sum(lens)
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16, generator=g)
    qw = (1.0 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    kw = (1.0 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])
    rot = RotaryEmbedding(D, 1_000_000.0, max(lens))
    cos, sin = rot.cos_sin(pos)
    ch, sh = rot.cos_sin_half(pos, torch.bfloat16)
    # k's norm + rotary in place (as the model does before attention); q stays raw.
    F.qk_norm_rope_(qkv[:, HQ * D :], qw, kw, cos, sin, 0, HKV, D, 1e-6)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(t, HKV, D)
    q_scale, k_scale = static_scale(qw), static_scale(kw)
    k8 = (k.float() / k_scale).clamp(-448.0, 448.0).to(E4M3)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lens, device="cuda").cumsum(0)
    return {
        "q": qkv[:, : HQ * D].view(t, HQ, D), "k": k, "k8": k8,
        "v": qkv[:, (HQ + HKV) * D :].view(t, HKV, D), "cu": cu, "lens": lens,
        "rope": (qw, ch, sh, 1e-6), "scales": (q_scale, k_scale),
    }  # fmt: skip


def run(c: dict, out: torch.Tensor, fp8: bool) -> None:
    scale = D**-0.5 * math.log2(math.e)
    if fp8:
        sm90.launch(c["q"], c["k8"], c["v"], out, c["cu"], True, scale, *c["rope"],
                    qk_fp8_scales=c["scales"])  # fmt: skip
    else:
        sm90.launch(c["q"], c["k"], c["v"], out, c["cu"], True, scale, *c["rope"])


def reference_error(c: dict, out: torch.Tensor, limit: int = 2048) -> float:
    """max |out - float64 attention of the bf16 inputs| over the sequences up to `limit` tokens."""
    qw, ch, sh, eps = c["rope"]
    t = out.shape[0]
    q = c["q"].float()
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps)
    q = (q.to(torch.bfloat16).float() * qw.float()).to(torch.bfloat16).double()
    cos = torch.cat([ch, ch], -1).double()[:, None, :]
    sin = torch.cat([sh, sh], -1).double()[:, None, :]
    q = q * cos + torch.cat([-q[..., D // 2 :], q[..., : D // 2]], -1) * sin
    worst, start = 0.0, 0
    for n in c["lens"]:
        if n <= limit:
            sl = slice(start, start + n)
            qs = q[sl].transpose(0, 1)
            ks = c["k"][sl].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
            vs = c["v"][sl].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
            s = qs @ ks.transpose(1, 2) * D**-0.5
            s = s.masked_fill(torch.ones(n, n, device="cuda").triu(1).bool(), float("-inf"))
            want = (s.softmax(-1) @ vs).transpose(0, 1)
            worst = max(worst, (out[sl].double() - want).abs().max().item())
        start += n
    assert start == t
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=["2,3,0", "3,3,0"])
    ap.add_argument("--rep", type=float, default=200.0)
    args = ap.parse_args()
    cases = {
        "causal_single_7168_qrope": make_case([7168]),
        "causal_mixed_qrope": make_case(mixed_lengths(0, 64, 65536)),
    }
    rows = []
    for name, c in cases.items():
        flops = attention_flops(c["lens"], HQ, D, True)
        ref = torch.full_like(c["q"], float("nan"))
        run(c, ref, False)
        torch.cuda.synchronize()
        base_ms = triton.testing.do_bench(lambda c=c, o=ref: run(c, o, False), warmup=50,
                                          rep=args.rep)  # fmt: skip
        base = flops / base_ms / 1e9
        base_err = reference_error(c, ref)
        rows.append({"case": name, "method": "bf16", "ms": base_ms, "tflops": base, "x": 1.0,
                     "max_err_vs_fp64": base_err})  # fmt: skip
        print(f"{name:26s} bf16            {base_ms:8.3f} ms {base:7.1f} TFLOP/s "
              f"err {base_err:.3g}", flush=True)  # fmt: skip
        for cfg in args.configs:
            os.environ["SLIPSTREAM_SM90_CONFIG"] = cfg
            out = torch.full_like(c["q"], float("nan"))
            run(c, out, True)
            torch.cuda.synchronize()
            nan = bool(torch.isnan(out).any())
            diff = (out.float() - ref.float()).abs().max().item()
            err = reference_error(c, out)
            ms = triton.testing.do_bench(lambda c=c, o=out: run(c, o, True), warmup=50,
                                         rep=args.rep)  # fmt: skip
            tf = flops / ms / 1e9
            rows.append({
                "case": name, "method": f"qk_fp8[{cfg}]", "ms": ms, "tflops": tf, "x": tf / base,
                "max_abs_diff_vs_bf16": diff, "max_err_vs_fp64": err, "nan": nan,
            })  # fmt: skip
            print(f"{name:26s} qk_fp8[{cfg}]  {ms:8.3f} ms {tf:7.1f} TFLOP/s x{tf / base:.3f} "
                  f"diff {diff:.3g} err {err:.3g}{' NAN' if nan else ''}", flush=True)  # fmt: skip
        os.environ.pop("SLIPSTREAM_SM90_CONFIG", None)
    info = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "hq": HQ, "hkv": HKV, "head_dim": D, "rows": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
