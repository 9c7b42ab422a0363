"""Re-read `bench embed` JSONs taken with the old baseline warm-up (its first two batches only).

    python scripts/baseline_warm_reread.py FILE.json [...]

Until 2026-11-25 the baseline was warmed up with two batches, so its first timed pass also
warmed up every other padded shape (7-11 s instead of 5-6 s on `mixed`) and the median of three
passes was the slower of its two warm ones. This prints, per file, the baseline rate and the
speedup as recorded and as the median of the baseline's passes after the first (what a full
warm-up pass, the bench's protocol since, would have timed). slipstream's own passes followed a
full warm-up pass already and are taken as recorded.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main() -> int:
    print(f"{'file':48s} {'slipstream':>10s} {'baseline':>9s} {'warm-only':>9s} "
          f"{'speedup':>8s} {'warm-only':>9s}")  # fmt: skip
    for name in sys.argv[1:]:
        d = json.loads(Path(name).read_text())
        runs = [r for r in d["baseline_results"] if "seconds_runs" in r]
        recorded = max(r["items_per_s"] for r in runs)
        warm = max(d["items"] / statistics.median(r["seconds_runs"][1:]) for r in runs)
        print(f"{Path(name).name:48s} {d['items_per_s']:10.1f} {recorded:9.1f} {warm:9.1f} "
              f"{d['items_per_s'] / recorded:7.2f}x {d['items_per_s'] / warm:8.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
