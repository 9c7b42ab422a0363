"""Embedding CUDA graphs for a BERT encoder (CLS / mean pooling): eager vs graph replays, one
process, one GPU.

    python scripts/bert_graphs_ab.py [--out DIR] [--workload short --items 4000] [--json OUT]

Builds a random BERT with all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads,
intermediate 1536, vocab 30522, 512 positions) with transformers, with sentence-transformers
files selecting mean pooling (as MiniLM does), then times `Engine.embed_token_ids` on the
workload (lengths capped at 256, MiniLM's max_seq_length) with `disable_cuda_graph=True` and
with graphs (default), median of `--repeats` passes after a warm-up pass, and reports the
minimum cosine between the two engines' vectors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_minilm_shaped_bert(out: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default=None, help="where to write the checkpoint (default: a temp dir)"
    )
    ap.add_argument("--workload", default="short")
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (no graphs there)")
    args = ap.parse_args()

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    from slipstream import Engine
    from slipstream.bench.workloads import make_workload

    out = Path(args.out or tempfile.mkdtemp(prefix="bert_minilm_shape_"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = make_minilm_shaped_bert(out)
    wl = make_workload(args.workload, args.items, 30522, max_len=256, seed=0)
    seqs = [list(s) for s in wl.token_ids]
    rows = []
    vecs = {}
    for name, disable in (("eager", True), ("graphs", False)):
        eng = Engine(ckpt, device=args.device, dtype="bfloat16", disable_cuda_graph=disable)
        eng.embed_token_ids(seqs, show_progress=False)  # warm-up: autotune, capture
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            v = eng.embed_token_ids(seqs, show_progress=False)
            sync()
            times.append(time.perf_counter() - t0)
        vecs[name] = v
        wall = statistics.median(times)
        graphs = eng.runner.embed_graphs
        row = {
            "variant": name,
            "wall_s": wall,
            "items_per_s": len(seqs) / wall,
            "tokens_per_s": wl.total_tokens / wall,
            "graph_stats": graphs.stats() if graphs is not None else None,
        }
        rows.append(row)
        print(f"{name:8s} {row['items_per_s']:9.1f} items/s  wall {wall * 1e3:8.1f} ms  "
              f"graphs {row['graph_stats']}", flush=True)  # fmt: skip
        del eng
        if args.device == "cuda":
            torch.cuda.empty_cache()
    a, b = vecs["eager"], vecs["graphs"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ratio = rows[1]["items_per_s"] / rows[0]["items_per_s"]
    print(f"graphs / eager: {ratio:.2f}x; min cosine graphs vs eager {cos.min():.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "items": args.items, "tokens": wl.total_tokens,
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows,
                       "speedup_graphs": ratio, "cosine_min": float(cos.min())}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
