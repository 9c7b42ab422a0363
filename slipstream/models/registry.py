"""Model classes by architecture, and the one function that builds a loaded model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slipstream.attention.registry import get_backend_class
from slipstream.config import ModelConfig
from slipstream.models.loader import build_and_load


def load_model(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: str,
    debug_checks: bool = False,
    with_lm_head: bool = False,
) -> nn.Module:
    backend = get_backend_class(attention_backend)
    if cfg.arch == "qwen3":
        from slipstream.models.qwen3 import Qwen3Model

        def build() -> nn.Module:
            return Qwen3Model(cfg, backend, debug_checks, with_lm_head=with_lm_head)

    else:
        from slipstream.models.bert import BertModel

        def build() -> nn.Module:
            return BertModel(cfg, backend, debug_checks)

    return build_and_load(build, Path(cfg.model_dir), device, dtype)
