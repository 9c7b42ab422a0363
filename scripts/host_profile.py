"""Where the host's time goes while it enqueues embedding forwards (Python-level, cProfile).

    python scripts/host_profile.py --model DIR --workload short --items 4000 [--quantization fp8]

Runs the workload once to warm up, then once under cProfile, and prints the functions with the
most own time and the most cumulative time. cProfile slows every Python call by a similar
amount, so read the ranking, not the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
from _gpu_workload import add_args, warm_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, workload="short", items=4000)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", default=None, help="write the report here too")
    args = ap.parse_args()

    engine, wl = warm_engine(args)
    prof = cProfile.Profile()
    prof.enable()
    engine.embed_token_ids(wl.token_ids, show_progress=False)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
    print(buf.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
