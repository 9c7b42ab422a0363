"""ModelRunner: turns a Batch into device tensors, runs the model, pools."""

from __future__ import annotations

import torch

from slipstream.attention.base import AttentionMetadata
from slipstream.config import EngineConfig
from slipstream.engine.batch import Batch, Phase
from slipstream.layers.pooler import pool
from slipstream.models.registry import load_model


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        self.model = load_model(
            config.model,
            self.device,
            config.dtype,
            config.attention_backend,
            debug_checks=config.debug_checks,
        )
        if config.quantization == "fp8":
            from slipstream.layers.fp8 import quantize_model_fp8

            quantize_model_fp8(self.model, skip_layers=config.fp8_skip_layers)
        self.embed_graphs = self._make_embed_graphs()

    def _make_embed_graphs(self):  # type: ignore[no-untyped-def]
        """CUDA graphs for embedding forwards, or None where they do not apply: not CUDA, a
        backend whose packed path is not capture-safe, or debug checks (they read the device).
        The pooled forward reads device tensors only, for every pooling mode."""
        cfg = self.config
        from slipstream.engine.cuda_graph import GRAPH_SAFE_BACKENDS

        if not (
            cfg.cuda_graphs
            and self.device.type == "cuda"
            and cfg.attention_backend in GRAPH_SAFE_BACKENDS
            and not cfg.debug_checks
        ):
            return None
        from slipstream.engine.embed_graph import EmbedCudaGraphs

        return EmbedCudaGraphs(
            self.pooled_forward,
            self.device,
            cfg.max_batch_tokens,
            cfg.max_batch_size,
            cfg.model.causal,
            max_positions=cfg.model.max_position_embeddings,
        )

    def _last_token_model(self) -> bool:
        return self.config.model.pooling.mode == "last" and self.config.model.arch == "qwen3"

    def _device_tensors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        pin = dev.type == "cuda"
        ids = torch.from_numpy(batch.token_ids)
        pos = torch.from_numpy(batch.positions)
        cu = torch.tensor(batch.cu_seqlens, dtype=torch.int32)
        if pin:
            ids, pos, cu = ids.pin_memory(), pos.pin_memory(), cu.pin_memory()
        ids = ids.to(dev, non_blocking=True)
        pos = pos.to(dev, non_blocking=True)
        cu = cu.to(dev, non_blocking=True)
        meta = AttentionMetadata(
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=batch.max_seqlen,
            max_seqlen_k=batch.max_seqlen,
            seq_lens_q=batch.seq_lens,
            seq_lens_k=batch.seq_lens,
            causal=self.config.model.causal,
        )
        return ids, pos, meta

    @torch.inference_mode()
    def embed(self, batch: Batch) -> torch.Tensor:
        """Pooled, un-normalised float32 vectors [B, hidden] in the batch's order (on device)."""
        assert batch.phase is Phase.EMBED
        if self.embed_graphs is not None:
            pooled = self.embed_graphs.run(batch)
            if pooled is not None:
                return pooled
        ids, pos, meta = self._device_tensors(batch)
        return self.pooled_forward(ids, pos, meta)

    @torch.inference_mode()
    def pooled_forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The model and the pooling on device tensors: float32 [B, hidden]. Reads no host
        lengths (``meta``'s host tuples are not used), so a CUDA graph can capture it."""
        mode = self.config.model.pooling.mode
        if self._last_token_model():
            # The model returns the last token of each sequence only (the last layer skips
            # the rows that are not pooled).
            return self.model(ids, pos, meta, last_token_only=True).float()
        hidden = self.model(ids, pos, meta)
        return pool(hidden, meta.cu_seqlens_q, mode)
