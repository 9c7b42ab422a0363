"""Would fp8 attention keep the fp8 path within cosine 0.99? (CPU, simulated rounding.)

    python scripts/fp8_attn_sensitivity.py --model DIR [--items 24 --max-len 400]

Embeds a seeded `mixed` workload in fp32 with the torch attention backend, then again with
the default fp8 GEMMs (Fp8Linear reference path, first 2 decoder layers kept in the model
dtype) and, on top of them, attention operands rounded to float8_e4m3 the way an fp8
attention kernel would see them:

* ``qk``: q and k (after their RMSNorm and rotary) rounded to e4m3, one scale per tensor
  (amax / 448), before QK^T; P and V stay in the model dtype.
* ``qk+pv``: also P (the softmax probabilities, scaled by 448 before rounding) and V (one
  scale per tensor) rounded to e4m3 before P V.

Prints the minimum and mean cosine to fp32 per variant. It measures accuracy only: nothing
here runs an fp8 kernel.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def _round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 with one per-tensor scale (amax -> 448), back in x's dtype."""
    amax = x.abs().amax().clamp_min(1e-12)
    scale = E4M3_MAX / amax
    return (x * scale).to(E4M3).to(x.dtype) / scale


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, pv_fp8: bool
) -> torch.Tensor:
    """One sequence, [L, H, D] each (k/v already repeated to H heads); returns [L, H, D]."""
    lq, lk, d = q.shape[0], k.shape[0], q.shape[-1]
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    if causal:
        qi = torch.arange(lq)[:, None]
        kj = torch.arange(lk)[None, :]
        s = s.masked_fill(kj > qi + (lk - lq), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    if pv_fp8:
        # P in [0, 1]: scaled by 448 so its largest value lands at the top of the e4m3 range.
        p = (p * E4M3_MAX).to(E4M3).to(p.dtype) / E4M3_MAX
        v = _round_e4m3(v)
    return torch.einsum("hqk,khd->qhd", p, v) / denom.transpose(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=400)
    args = ap.parse_args()

    from slipstream import Engine
    from slipstream.attention.torch_backend import TorchAttentionBackend
    from slipstream.bench.workloads import make_workload
    from slipstream.layers.fp8 import Fp8Linear
    from slipstream.layers.linear import Linear

    eng = Engine(args.model, device="cpu", dtype="float32", attention_backend="torch")
    wl = make_workload("mixed", args.items, eng.model_config.vocab_size, max_len=args.max_len)
    seqs = [list(s) for s in wl.token_ids]
    ref = eng.embed_token_ids(seqs, show_progress=False)
    print(f"{len(seqs)} items, {sum(map(len, seqs))} tokens, longest {max(map(len, seqs))}")

    layers = eng.runner.model.layers
    for i, layer in enumerate(layers):
        if i < 2:
            continue
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, Linear):
                parent_name, _, attr = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, attr, Fp8Linear.from_linear(mod, use_scaled_mm=False))

    real_forward = TorchAttentionBackend.forward
    mode = {"qk": False, "pv": False}

    def forward(self, q, k, v, out, meta, q_norm_rope=None):  # type: ignore[no-untyped-def]
        if not mode["qk"]:
            return real_forward(self, q, k, v, out, meta, q_norm_rope)
        group = self.num_heads // self.num_kv_heads
        sq = sk = 0
        for lq, lk in zip(meta.seq_lens_q, meta.seq_lens_k, strict=False):
            qs = _round_e4m3(q[sq : sq + lq].float())
            ks = _round_e4m3(k[sk : sk + lk].float()).repeat_interleave(group, dim=1)
            vs = v[sk : sk + lk].float().repeat_interleave(group, dim=1)
            if lq:
                o = _attention(qs, ks, vs, meta.causal, mode["pv"])
                out[sq : sq + lq] = o.to(out.dtype)
            sq += lq
            sk += lk
        return None

    TorchAttentionBackend.forward = forward  # type: ignore[method-assign]
    try:
        for name, qk, pv in (
            ("fp8 GEMMs (skip 2)", False, False),
            ("+ fp8 QK^T", True, False),
            ("+ fp8 QK^T and PV", True, True),
        ):
            mode.update(qk=qk, pv=pv)
            vec = eng.embed_token_ids(seqs, show_progress=False)
            cos = (vec * ref).sum(1) / (np.linalg.norm(vec, axis=1) * np.linalg.norm(ref, axis=1))
            print(
                f"{name:22s} cosine to fp32: min {cos.min():.4f} mean {cos.mean():.5f}", flush=True
            )
    finally:
        TorchAttentionBackend.forward = real_forward  # type: ignore[method-assign]


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
