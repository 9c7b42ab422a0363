"""Helpers that build checkpoints with transformers itself (test-only dependency)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def save_hf_qwen3(
    out: Path,
    *,
    layout: str,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tied: bool = True,
    hidden: int = 64,
    head_dim: int = 16,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    tokenizer_from: Path | None = None,
) -> Path:
    """Random Qwen3 saved by transformers: ``layout`` 'model' (Qwen3Model, no prefix) or
    'causal-lm' (Qwen3ForCausalLM, keys under model. plus lm_head when untied)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0 if seed % 2 == 0 else 10_000.0,
        tie_word_embeddings=tied,
    )
    cls: Any = Qwen3Model if layout == "model" else Qwen3ForCausalLM
    model = cls(cfg).to(dtype)
    # Norm weights start at exactly 1: perturb them so a missed norm weight would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / f, out / f)
    return out


def hf_hidden_states(model_dir: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per-token last hidden states from transformers, one sequence at a time (fp32)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for s in seqs:
            outs.append(model(input_ids=torch.tensor([s])).last_hidden_state[0])
    return outs
