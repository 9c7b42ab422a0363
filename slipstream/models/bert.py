"""BERT encoder (as in sentence-transformers' all-MiniLM-L6-v2) on a packed token stream."""

from __future__ import annotations

import torch
from torch import nn

from slipstream.attention.base import AttentionBackend, AttentionMetadata
from slipstream.config import ModelConfig
from slipstream.layers.activation import gelu
from slipstream.layers.attention import Attention
from slipstream.layers.linear import Linear


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token type 0 everywhere, so add its row once (broadcast).
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, debug_checks: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.hidden = cfg.hidden_size
        self.act = cfg.hidden_act
        self.qkv_proj = Linear(
            cfg.hidden_size, [cfg.hidden_size] * 3, bias=True, partitions=["q", "k", "v"]
        )
        self.attn = Attention(backend, debug_checks)
        self.o_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, h = x.shape[0], self.hidden
        qkv = self.qkv_proj(x)
        q = qkv[:, :h].view(t, self.num_heads, self.head_dim)
        k = qkv[:, h : 2 * h].view(t, self.num_heads, self.head_dim)
        v = qkv[:, 2 * h :].view(t, self.num_heads, self.head_dim)
        x = self.attn_norm(self.o_proj(self.attn(q, k, v, meta)) + x)
        return self.mlp_norm(self.down_proj(gelu(self.up_proj(x), self.act)) + x)


class BertModel(nn.Module):
    # checkpoint layer suffix -> (our module, partition)
    _layer_map = {
        "attention.self.query": ("qkv_proj", "q"),
        "attention.self.key": ("qkv_proj", "k"),
        "attention.self.value": ("qkv_proj", "v"),
        "attention.output.dense": ("o_proj", None),
        "attention.output.LayerNorm": ("attn_norm", None),
        "intermediate.dense": ("up_proj", None),
        "output.dense": ("down_proj", None),
        "output.LayerNorm": ("mlp_norm", None),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        backend_factory: type[AttentionBackend],
        debug_checks: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        scale = cfg.head_dim**-0.5
        self.layers = nn.ModuleList(
            BertLayer(
                cfg,
                backend_factory(cfg.num_heads, cfg.num_heads, cfg.head_dim, scale, i),
                debug_checks,
            )
            for i in range(cfg.num_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embeddings(input_ids, positions)
        for i, layer in enumerate(self.layers):
            with torch.profiler.record_function(f"slipstream::layer_{i}"):
                x = layer(x, meta)
        return x

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        if name.startswith("bert."):
            name = name[len("bert.") :]
        if name.startswith(("pooler.", "cls.")) or name == "embeddings.position_ids":
            return None  # heads and buffers the embedding path does not use
        if name.startswith("embeddings."):
            return name, None
        if name.startswith("encoder.layer."):
            rest = name[len("encoder.layer.") :]
            idx, _, sub = rest.partition(".")
            module, _, leaf = sub.rpartition(".")
            if module in self._layer_map:
                ours, shard = self._layer_map[module]
                return f"layers.{idx}.{ours}.{leaf}", shard
        return name, None
