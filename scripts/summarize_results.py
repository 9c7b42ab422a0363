"""Print a short table of the GPU results found in a folder (last thing gpu_check prints)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    res = Path(folder)
    for f in sorted(res.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 - a summary must not die on one bad file
            print(f"{f.name}: unreadable ({e})")
            continue
        keys = [
            "items_per_s",
            "baseline_items_per_s",
            "speedup",
            "mfu",
            "cosine_min",
            "dtod_events_total",
            "dtod_events_per_layer",
            "forward_ms",
            "copy_share",
        ]
        picked = {k: d[k] for k in keys if k in d}
        if "dtod_events_per_layer" in picked:
            per = picked["dtod_events_per_layer"]
            picked["dtod_events_per_layer"] = f"{per[:4]}... (n={len(per)}, sum={sum(per)})"
        print(f"{f.name}: {json.dumps(picked) if picked else list(d)[:12]}")
    for log in sorted(res.glob("*.log")):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print(f"--- {log.name}: " + " | ".join(tail))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
