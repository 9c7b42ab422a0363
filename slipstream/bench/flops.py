"""Model FLOPs of an embedding forward, counted from the config (not measured).

Linear layers: 2 FLOPs per multiply-add, ``2 * ModelConfig.linear_params_per_token()`` per
token. Attention (QK^T and PV, 2 * 2 * D FLOPs per query/key pair and head) over the pairs
a sequence really computes: ``L * (L + 1) / 2`` for causal models, ``L^2`` for bidirectional
ones. Embedding lookups, norms, activations and softmax are left out (they are memory-bound
and small next to the GEMMs), as is usual for model FLOP utilisation (MFU).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import torch

from slipstream.config import ModelConfig


def linear_flops(cfg: ModelConfig, num_tokens: int) -> int:
    return 2 * cfg.linear_params_per_token() * int(num_tokens)


def attention_flops(cfg: ModelConfig, seq_len: int) -> int:
    """QK^T + PV FLOPs of one sequence of ``seq_len`` tokens over all layers."""
    n = int(seq_len)
    pairs = n * (n + 1) // 2 if cfg.causal else n * n
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs


def embed_flops(cfg: ModelConfig, seq_lens: Iterable[int]) -> int:
    """Model FLOPs of embedding every sequence once (prefill only, no padding counted)."""
    lens = [int(n) for n in seq_lens]
    return linear_flops(cfg, sum(lens)) + sum(attention_flops(cfg, n) for n in lens)


def measure_peak_tflops(
    device: str | torch.device,
    dtype: torch.dtype = torch.bfloat16,
    n: int | None = None,
    iters: int = 10,
) -> float:
    """Achievable dense-matmul TFLOP/s on ``device``: median of ``iters`` timed n^3 GEMMs.

    On CUDA: an 8192^3 GEMM in ``dtype`` timed with CUDA events (after warm-up). On CPU a
    smaller one (1024^3), timed with perf_counter, so that an MFU can still be printed.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        n = n or 8192
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        torch.cuda.synchronize(dev)
        times_ms: list[float] = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 / (statistics.median(times_ms) * 1e-3) / 1e12
    import time

    n = n or 1024
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    times_s: list[float] = []
    for _ in range(max(1, min(iters, 3))):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times_s.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times_s) / 1e12
