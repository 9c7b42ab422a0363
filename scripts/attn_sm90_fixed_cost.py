"""Where the Gluon sm90 kernel's per-tile fixed cost goes (GPU diagnostic, not a benchmark).

    python scripts/attn_sm90_fixed_cost.py --json OUT.json [--rep 50]

The crossover runs (attention_crossover_h100.json) fit to ~9 us per tile plus ~1.5 us per key
block per wave of 132 programs: a tile with one key block costs as much as six key blocks of a
long tile. This script times the kernel with parts of a tile's fixed work taken out, to see
which part that cost is:

* ``rope``: the production call (q RMSNorm + rotary applied on the Q load);
* ``plain``: q loaded as is (no prologue math);
* ``noq``: no Q load at all (the tile's Q is zeros);
* ``nostore``: the epilogue's store predicated off (the output is not written);
* each with one program per tile (P0) and with the persistent grid (P1);
* with ``--baseline-src``, another version of the kernel file (``baseline``: its production
  call, ``baseline plain``: without the prologue), for an A/B in one process.

The variants other than ``rope`` / ``plain`` are textual patches of
slipstream/kernels/flash_attn_sm90.py written to a temporary directory and imported from there:
their outputs are wrong on purpose and are not compared. Cases: packed causal batches of ~16K
tokens whose longest sequence is the cap (attn_crossover's lengths) and one 7168-token
sequence. For every variant, a least-squares fit of time per wave against (tiles, key blocks)
per wave gives its fixed cost per tile and its cost per key block.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from attn_crossover import HQ, D, lengths, make_case, write_json  # noqa: E402

from slipstream.kernels import flash_attn_sm90 as sm90  # noqa: E402

SRC = REPO / "slipstream" / "kernels" / "flash_attn_sm90.py"
# The plain Q load and the epilogue store, as the committed kernel spells them (and as the
# prologue experiment, benchmarks/results/sm90_prologue_pin_experiment.diff, does): each patch
# lists alternatives, and exactly one must occur once.
Q_LOADS = [
    ("x = gl.load(q_rows + gl.expand_dims(d, 0), mask=row_ok, other=0.0)",
     "x = gl.zeros([BLOCK_M, HEAD_DIM], dtype, ld)"),
    ("q_smem.store(gl.load(q_rows + gl.expand_dims(d, 0), mask=row_ok, other=0.0))",
     "q_smem.store(gl.zeros([BLOCK_M, HEAD_DIM], dtype, ld))"),
]  # fmt: skip
STORES = [
    ("gl.store(o_ptrs, o, mask=gl.expand_dims(o_pos < seqlen, 1))",
     "gl.store(o_ptrs, o, mask=gl.expand_dims(o_pos < m0 - 1000000000, 1))"),
]  # fmt: skip
PATCHES = {"noq": Q_LOADS, "nostore": STORES}


def patched_module(name: str, tmp: Path, src: Path = SRC):
    text = src.read_text()
    if name in PATCHES:
        hits = [(old, new) for old, new in PATCHES[name] if text.count(old) == 1]
        if len(hits) != 1:
            raise SystemExit(
                f"patch {name!r}: the kernel source has none (or several) of its targets"
            )
        text = text.replace(*hits[0])
    path = tmp / f"sm90_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"sm90_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def counts(lens: list[int]) -> tuple[int, int]:
    """The kernel's live tiles and causal key blocks for these sequences (all head groups)."""
    bm, bn, groups = sm90.BLOCK_M, sm90.BLOCK_N, HQ // sm90.PACK
    tiles = blocks = 0
    for n in lens:
        for m0 in range(0, n, bm):
            tiles += 1
            blocks += -(-min(m0 + bm, n) // bn)
    return tiles * groups, blocks * groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--rep", type=float, default=50.0)
    ap.add_argument("--caps", default="64,256,1024,2048,4096")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="another version of flash_attn_sm90.py, timed as variant 'baseline' "
                    "(its production call) for a same-process A/B")  # fmt: skip
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = {f"cap{cap}": lengths(cap, 16384, seed=cap) for cap in map(int, args.caps.split(","))}
    cases["single7168"] = [7168]
    tmp = Path(tempfile.mkdtemp(prefix="sm90_diag_"))
    mods = {name: patched_module(name, tmp) for name in ("base", "noq", "nostore")}
    variants = {  # name -> (module, with the q prologue)
        "rope": (mods["base"], True),
        "plain": (mods["base"], False),
        "noq": (mods["noq"], False),
        "nostore": (mods["nostore"], True),
    }
    if args.baseline_src is not None:
        variants["baseline"] = (patched_module("baseline", tmp, args.baseline_src), True)
        variants["baseline plain"] = (variants["baseline"][0], False)
    scale = D**-0.5 * 1.4426950408889634  # softmax scale * log2(e), as flash_attn passes it
    rows = []
    for cname, lens in cases.items():
        c = make_case(lens)
        tiles, blocks = counts(lens)
        for vname, (mod, rope) in variants.items():
            extra = c["extra"] if rope else {}
            for persistent in (0, 1):
                os.environ["SLIPSTREAM_SM90_CONFIG"] = (
                    f"{sm90.K_STAGES},{sm90.V_STAGES},{persistent}"
                )
                out = torch.empty_like(c["q"])

                def go(mod=mod, out=out, extra=extra, c=c, scale=scale):
                    mod.launch(c["q"], c["k"], c["v"], out, c["cu"], True, scale, **extra)

                go()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(go, warmup=10, rep=args.rep)
                rows.append({
                    "case": cname, "variant": vname, "persistent": persistent, "ms": ms,
                    "tiles": tiles, "blocks": blocks,
                })  # fmt: skip
                print(f"{cname:11s} {vname:8s} P{persistent} {ms * 1e3:8.1f} us  tiles {tiles} "
                      f"blocks {blocks}", flush=True)  # fmt: skip
        os.environ.pop("SLIPSTREAM_SM90_CONFIG", None)
    fits = {}
    for vname in variants:
        for persistent in (0, 1):
            sel = [r for r in rows if r["variant"] == vname and r["persistent"] == persistent]
            a = torch.tensor(
                [[r["tiles"] / sms, r["blocks"] / sms] for r in sel], dtype=torch.float64
            )
            y = torch.tensor([r["ms"] * 1e3 for r in sel], dtype=torch.float64)
            sol = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
            key = f"{vname} P{persistent}"
            fits[key] = {"us_per_tile_wave": sol[0].item(), "us_per_block_wave": sol[1].item()}
            print(
                f"fit {key:12s} per tile {sol[0].item():6.2f} us  per block {sol[1].item():6.3f} us"
            )
    write_json(args.json, sms=sms, rows=rows, fits=fits)


if __name__ == "__main__":
    main()
