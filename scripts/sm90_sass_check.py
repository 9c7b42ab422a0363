"""Compile the Gluon sm90 attention kernel for sm_90a without a GPU and check its SASS.

    python scripts/sm90_sass_check.py [--causal 0|1] [--q-rope 0|1] [--config K,V,P] [--sass OUT]

What it reports, per pipelined key block in the SASS (ptxas decides these, not the source):
how many of the softmax's MUFU.EX2 instructions sit between the wgmma wait that leaves one
group in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x1`) and the full wait (`... 0x0`), i.e. run while
P @ V is on the tensor cores (66 per block is all of them: 64 for P, 2 for the rescale), the
register spill instructions, and the shared memory. Small source edits can make ptxas hoist the
full wait above the exponentials (docs/performance.md), so check before spending GPU time.
Exit status 1 if a block overlaps fewer than --min-overlap exponentials (spills are reported:
the committed kernel has 3 spill instructions, outside the key loops). Uses the Triton install's own ptxas and cuobjdump; the GPU machine runs Triton 3.6,
whose ptxas is the one that matters (another release compiles differently).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compile_kernel(causal: bool, q_rope: bool, config: str | None) -> tuple[bytes, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from slipstream.kernels import flash_attn_sm90 as f

    saved = os.environ.get("SLIPSTREAM_SM90_CONFIG")
    try:  # parse `config` the way the launcher does, leaving the environment as it was
        if config:
            os.environ["SLIPSTREAM_SM90_CONFIG"] = config
        cfg = f._config()
    finally:
        if saved is None:
            os.environ.pop("SLIPSTREAM_SM90_CONFIG", None)
        else:
            os.environ["SLIPSTREAM_SM90_CONFIG"] = saved
    kernel = f._flash_attn_sm90_kernel
    layout = gl.NVMMASharedLayout.get_default_for([f.BLOCK_N, f.HEAD_DIM], gl.bfloat16)
    desc = f"tensordesc<bf16[{f.BLOCK_N}, {f.HEAD_DIM}],{layout}>"
    const = {
        "CAUSAL": causal, "Q_ROPE": q_rope, "BLOCK_M": f.BLOCK_M, "BLOCK_N": f.BLOCK_N,
        "HEAD_DIM": f.HEAD_DIM, "K_STAGES": cfg["K_STAGES"], "V_STAGES": cfg["V_STAGES"],
        "PACK": f.PACK, "CONSUMER_REGS": f.CONSUMER_REGS,
    }  # fmt: skip
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ("Q", "Out", "QW", "COS", "SIN"):
            sig[name] = "*bf16"
        elif name in ("k_desc", "v_desc"):
            sig[name] = desc
        elif name == "cu_seqlens":
            sig[name] = "*i32"
        elif name in ("qk_scale", "q_eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name in ("Q", "Out", "cu_seqlens") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher specialises on
    compiled = triton.compile(
        GluonASTSource(kernel, sig, const, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )
    return compiled.asm["cubin"], compiled.metadata.shared


def sass_of(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run(
            [str(tool), "-sass", fh.name], capture_output=True, text=True, check=True
        ).stdout


def overlap_counts(sass: str) -> list[int]:
    """MUFU.EX2 count between each `DEPBAR.LE gsb0, 0x1` and the next `DEPBAR.LE gsb0, 0x0`."""
    counts, inside, n = [], False, 0
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            inside, n = True, 0
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            if inside:
                counts.append(n)
            inside = False
        elif inside and "MUFU.EX2" in line:
            n += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--q-rope", type=int, default=1)
    ap.add_argument("--config", default=None, help="SLIPSTREAM_SM90_CONFIG for the compile")
    ap.add_argument("--min-overlap", type=int, default=60)
    ap.add_argument("--sass", type=Path, default=None, help="also write the SASS here")
    args = ap.parse_args()
    import triton

    cubin, smem = compile_kernel(bool(args.causal), bool(args.q_rope), args.config)
    sass = sass_of(cubin)
    if args.sass:
        args.sass.write_text(sass)
    counts = overlap_counts(sass)
    spills = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    print(f"triton {triton.__version__}  causal={args.causal} q_rope={args.q_rope}  "
          f"shared memory {smem} bytes")  # fmt: skip
    print(f"exponentials under the in-flight P @ V, per pipelined block: {counts} (66 = all)")
    print(f"register spill instructions (LDL/STL): {spills}")
    ok = bool(counts) and min(counts) >= args.min_overlap
    print("OK" if ok else f"FAIL: some block overlaps fewer than {args.min_overlap}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
