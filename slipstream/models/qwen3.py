"""Qwen3 decoder (Qwen3-Embedding and Qwen3 causal LM trunks) on a packed token stream."""

from __future__ import annotations

import os

import torch
from torch import nn

from slipstream.attention.base import AttentionBackend, AttentionMetadata, QNormRope
from slipstream.config import ModelConfig
from slipstream.kernels import fused as fused_ops
from slipstream.layers.activation import silu_and_mul
from slipstream.layers.attention import Attention
from slipstream.layers.fp8 import Fp8Rows
from slipstream.layers.linear import Linear
from slipstream.layers.norm import RMSNorm
from slipstream.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, debug_checks: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.q_size
        self.kv_size = cfg.kv_size
        self.qkv_proj = Linear(
            cfg.hidden_size,
            [cfg.q_size, cfg.kv_size, cfg.kv_size],
            bias=cfg.attention_bias,
            partitions=["q", "k", "v"],
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        # Fusion mode ('off' / 'auto' / 'always'), read from SLIPSTREAM_FUSED once, here.
        self.fused = fused_ops.fusion_mode()
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, fused=self.fused)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, fused=self.fused)
        self.attn = Attention(backend, debug_checks)

    def forward(
        self,
        x: torch.Tensor | Fp8Rows,  # [T, hidden] (quantised already for an fp8 qkv_proj)
        cos: torch.Tensor,  # [T, head_dim] float32
        sin: torch.Tensor,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,  # [B] int64: compute the output for these rows only
        rope_half: tuple[torch.Tensor, torch.Tensor] | None = None,  # for the q prologue
        add_to: torch.Tensor | None = None,  # residual stream: o_proj's output is added into it
    ) -> torch.Tensor:  # [T, hidden], or [B, hidden] with rows (``add_to`` itself if given)
        qkv = self.qkv_proj(x)  # [T, q + 2 kv]
        t = qkv.shape[0]
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(
            t, self.num_kv_heads, self.head_dim
        )
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if rope_half is not None and rows is None:
            # (The model passes rope_half only when the fused path and the backend's q
            # prologue are both on.) k's norm + rotary in place into qkv; q's are applied by
            # the attention kernel as it loads each query tile, so q is read once and never
            # written back.
            fused_ops.qk_norm_rope_(
                qkv[:, self.q_size :], self.q_norm.weight, self.k_norm.weight, cos, sin,
                0, self.num_kv_heads, self.head_dim, self.k_norm.eps,
            )  # fmt: skip
            rope = QNormRope(self.q_norm.weight, rope_half[0], rope_half[1], self.q_norm.eps)
            return _project(self.o_proj, self.attn(q, k, v, meta, q_norm_rope=rope), add_to)
        if fused_ops.should_fuse(self.fused, qkv):
            # q/k norm + rotary in one kernel, written in place into qkv (so into q and k).
            fused_ops.qk_norm_rope_(
                qkv, self.q_norm.weight, self.k_norm.weight, cos, sin,
                self.num_heads, self.num_kv_heads, self.head_dim, self.q_norm.eps,
            )  # fmt: skip
        else:
            q = RotaryEmbedding.rotate(self.q_norm(q), cos, sin)
            k = RotaryEmbedding.rotate(self.k_norm(k), cos, sin)
        # v stays a strided view of qkv: backends read it through its strides, no copy.
        if rows is None:
            return _project(self.o_proj, self.attn(q, k, v, meta), add_to)
        # Only the rows that are pooled need an output: one query per sequence (its last
        # token) against all of that sequence's keys, bottom-right aligned, so the query
        # sees every key. The gather copies B rows, not T.
        b = rows.shape[0]
        meta_rows = AttentionMetadata(
            cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32, device=qkv.device),
            cu_seqlens_k=meta.cu_seqlens_k,
            max_seqlen_q=1,
            max_seqlen_k=meta.max_seqlen_k,
            seq_lens_q=(1,) * b,
            seq_lens_k=meta.seq_lens_k,
            causal=meta.causal,
        )
        return _project(self.o_proj, self.attn(q[rows], k, v, meta_rows), add_to)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, partitions=["gate", "up"]
        )
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.fused = fused_ops.fusion_mode()

    def forward(
        self, x: torch.Tensor | Fp8Rows, add_to: torch.Tensor | None = None
    ) -> torch.Tensor:
        # fp8: the fused activation kernel hands down_proj its input already quantised.
        act = silu_and_mul(
            self.gate_up_proj(x), fused=self.fused, fp8=self.down_proj.takes_fp8_rows
        )
        return _project(self.down_proj, act, add_to)


def _project(proj: Linear, x: torch.Tensor, add_to: torch.Tensor | None) -> torch.Tensor:
    """``proj(x)``, or with ``add_to`` (the residual stream) ``add_to += proj(x)`` in place
    through the GEMM epilogue (`Qwen3DecoderLayer._adds_into_stream` checked that it can)."""
    if add_to is None:
        return proj(x)
    return proj.add_into_(x, add_to)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, debug_checks: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Qwen3Attention(cfg, backend, debug_checks)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = Qwen3MLP(cfg)
        # The residual add rides on o_proj's and down_proj's GEMM epilogue where it can
        # (see `_forward_stream`). SLIPSTREAM_RESIDUAL_GEMM=0 turns it off (A/B).
        self.residual_gemm = os.environ.get("SLIPSTREAM_RESIDUAL_GEMM", "1") != "0"

    def _adds_into_stream(self, x: torch.Tensor) -> bool:
        # Only where the fused kernels run (so SLIPSTREAM_FUSED=0 keeps the reference
        # numerics), and only when both projections are plain bias-free Linear layers of the
        # activation dtype: an fp8 GEMM has no accumulate-into-C form in torch.
        if not (
            self.residual_gemm
            and x.dim() == 2
            and x.is_contiguous()
            and fused_ops.should_fuse(self.self_attn.fused, x)
        ):
            return False
        o_proj, down_proj = self.self_attn.o_proj, self.mlp.down_proj
        return (
            isinstance(o_proj, Linear)
            and isinstance(down_proj, Linear)
            and o_proj.bias is None
            and down_proj.bias is None
            and o_proj.weight.dtype == x.dtype == down_proj.weight.dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
        rope_half: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (x, residual) for the next layer. ``residual is None`` means ``x`` is the
        whole residual stream (after the embedding, and after a layer that added its outputs
        into the stream itself)."""
        if self._adds_into_stream(x):
            return self._forward_stream(x, residual, cos, sin, meta, rows, rope_half), None
        # With fp8 GEMMs the norms quantise their output for the projection that reads it.
        fp8_in = self.self_attn.qkv_proj.takes_fp8_rows
        if residual is None:
            residual = x
            h = self.input_layernorm(x, fp8=fp8_in)
        else:
            h, residual = self.input_layernorm.forward_residual(x, residual, fp8=fp8_in)
        a = self.self_attn(h, cos, sin, meta, rows, rope_half)
        if rows is not None:
            residual = residual[rows]
        fp8_mlp = self.mlp.gate_up_proj.takes_fp8_rows
        h, residual = self.post_attention_layernorm.forward_residual(a, residual, fp8=fp8_mlp)
        return self.mlp(h), residual

    def _forward_stream(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        rows: torch.Tensor | None,
        rope_half: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        # o_proj and down_proj add their outputs into the stream in their GEMM epilogues, so
        # each norm reads one tensor (the stream) and writes one (its output), where the
        # add-then-norm kernel reads two and writes two. The stream is updated in place: it is
        # this layer's own tensor (the embedding output, or the previous layer's stream).
        stream = x if residual is None else x + residual  # after a layer of the other kind
        h = self.input_layernorm(stream)
        if rows is not None:
            stream = stream[rows]  # the gathered rows: a new tensor, the one returned
        stream = self.self_attn(h, cos, sin, meta, rows, rope_half, add_to=stream)
        h = self.post_attention_layernorm(stream)
        return self.mlp(h, add_to=stream)


class Qwen3Model(nn.Module):
    """The trunk: embeddings, decoder layers, final norm. ``lm_head`` only for generation."""

    # checkpoint sub-module name -> (our merged module, partition)
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        backend_factory: type[AttentionBackend],
        debug_checks: bool = False,
        with_lm_head: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        scale = cfg.head_dim**-0.5
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(
                cfg,
                backend_factory(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale, i),
                debug_checks,
            )
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.with_lm_head = with_lm_head
        self.lm_head: Linear | None = None
        if with_lm_head and not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int
        positions: torch.Tensor,  # [T] int, restarting at 0 per sequence
        meta: AttentionMetadata,
        last_token_only: bool = False,
    ) -> torch.Tensor:  # [T, hidden], or [B, hidden] (each sequence's last token)
        """With ``last_token_only`` (last-token pooling) the final layer computes attention
        output, MLP and norm for each sequence's last token only: the other rows of the last
        layer feed nothing that is returned, so they are not computed."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions)
        rope_half = None
        if self.layers and self._q_prologue(x, meta):
            # The attention kernel applies q's norm + rotary itself, from half-width tables in
            # the activation dtype (gathered once per forward for all layers).
            rope_half = self.rotary.cos_sin_half(positions, x.dtype)
        residual = None
        last = len(self.layers) - 1
        rows = meta.cu_seqlens_q[1:].long() - 1 if last_token_only else None
        for i, layer in enumerate(self.layers):
            with torch.profiler.record_function(f"slipstream::layer_{i}"):
                x, residual = layer(
                    x, residual, cos, sin, meta, rows if i == last else None, rope_half
                )
        if residual is None:  # a model without layers
            return self.norm(x)
        x, _ = self.norm.forward_residual(x, residual)
        return x

    def _q_prologue(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        attn = self.layers[0].self_attn
        return fused_ops.should_fuse(attn.fused, x) and attn.attn.backend.fuses_q_norm_rope(meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """Checkpoint tensor name -> (parameter name, partition) or None to ignore it."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if name == "lm_head.weight":
            if self.lm_head is not None:
                return name, None
            return None  # tied, or the embedding path which never needs it
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in self.packed:
            merged, shard = self.packed[parts[-2]]
            parts[-2] = merged
            return ".".join(parts), shard
        if name.endswith("rotary_emb.inv_freq"):
            return None
        return name, None
