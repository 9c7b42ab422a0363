"""Which decoder layers' fp8 error costs the most cosine? (CPU, the exact fp8 reference path.)

    python scripts/fp8_layer_sensitivity.py --model DIR [--items 24 --max-len 400] [VARIANT ...]

VARIANT: a name from the table in main(), or skipN / no_<proj> / a `+` of them (any model).

Embeds a seeded `mixed` workload in fp32, then with chosen Linear modules replaced by
Fp8Linear (dequantising reference GEMM: fp8 products, fp32 sums), and prints the minimum and
mean cosine to fp32 per variant. Used for the fp8_skip_layers default (docs/performance.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("variants", nargs="*")
    args = ap.parse_args()

    from slipstream import Engine
    from slipstream.bench.workloads import make_workload
    from slipstream.layers.fp8 import Fp8Linear
    from slipstream.layers.linear import Linear

    eng = Engine(args.model, device="cpu", dtype="float32")
    wl = make_workload("mixed", args.items, eng.model_config.vocab_size, max_len=args.max_len)
    seqs = [list(s) for s in wl.token_ids]
    ref = eng.embed_token_ids(seqs, show_progress=False)
    layers = eng.runner.model.layers
    n = len(layers)
    orig = {
        (i, name): mod
        for i, layer in enumerate(layers)
        for name, mod in layer.named_modules()
        if isinstance(mod, Linear)
    }
    fp8 = {key: Fp8Linear.from_linear(mod, use_scaled_mm=False) for key, mod in orig.items()}

    def apply(pred: Callable[[int, str], bool]) -> None:
        for (i, name), mod in orig.items():
            parent_name, _, attr = name.rpartition(".")
            parent = layers[i].get_submodule(parent_name) if parent_name else layers[i]
            setattr(parent, attr, fp8[(i, name)] if pred(i, name) else mod)

    variants: dict[str, Callable[[int, str], bool]] = {
        "all": lambda i, name: True,
        "no_qkv": lambda i, name: not name.endswith("qkv_proj"),
        "no_o": lambda i, name: not name.endswith("o_proj"),
        "no_gate_up": lambda i, name: not name.endswith("gate_up_proj"),
        "no_down": lambda i, name: not name.endswith("down_proj"),
        "only_layer0": lambda i, name: i == 0,
        "only_layer1": lambda i, name: i == 1,
        "only_middle": lambda i, name: i == n // 2,
        "only_last": lambda i, name: i == n - 1,
        "skip1": lambda i, name: i >= 1,
        "skip2": lambda i, name: i >= 2,
        "skip2_last2": lambda i, name: 2 <= i < n - 2,
    }
    for name in args.variants or list(variants):
        if name not in variants:
            variants[name] = _generic_variant(name)
        apply(variants[name])
        v = eng.embed_token_ids(seqs, show_progress=False)
        cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
        print(f"{name:14s} cosine to fp32: min {cos.min():.4f} mean {cos.mean():.5f}", flush=True)
    apply(lambda i, name: False)


def _generic_variant(name: str) -> Callable[[int, str], bool]:
    """``skipN``: every layer from N on in fp8; ``no_<proj>``: every Linear but those whose name
    ends in <proj> (e.g. ``no_up_proj`` for BERT); combined with ``+``: ``skip2+no_down_proj``."""
    preds: list[Callable[[int, str], bool]] = []
    for part in name.split("+"):
        if part.startswith("skip") and part[4:].isdigit():
            k = int(part[4:])
            preds.append(lambda i, _n, k=k: i >= k)
        elif part.startswith("no_") and len(part) > 3:
            suffix = part[3:]
            preds.append(lambda _i, n, s=suffix: not n.endswith(s))
        else:
            raise SystemExit(f"unknown variant {part!r}")
    return lambda i, n: all(p(i, n) for p in preds)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
