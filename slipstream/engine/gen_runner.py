"""GenerationRunner: a GenerationBatch -> paged metadata -> model forward -> logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slipstream.attention.paged import PagedAttentionMetadata, build_paged_metadata
from slipstream.config import ModelConfig
from slipstream.engine.batch import Phase
from slipstream.engine.gen_batch import GenerationBatch
from slipstream.errors import ModelLoadError
from slipstream.kv.pool import KVPool

if TYPE_CHECKING:
    from slipstream.engine.cuda_graph import DecodeCudaGraphs

logger = logging.getLogger("slipstream")


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The [vocab, hidden] matrix ``model.logits`` multiplies by (tied: the embeddings)."""
    m: Any = model
    head = getattr(m, "lm_head", None)
    if head is not None:
        return head.weight  # type: ignore[no-any-return]
    return m.embed_tokens.weight  # type: ignore[no-any-return]


def attach_lm_head(model: nn.Module, cfg: ModelConfig, device: torch.device) -> None:
    """Give an embedding-loaded Qwen3 trunk the output projection generation needs.

    Tied checkpoints need nothing (``logits`` uses the embedding matrix). Untied ones get their
    ``lm_head.weight`` read from the checkpoint now: one extra [vocab, hidden] tensor, instead of
    loading a second copy of the model.
    """
    if cfg.tie_word_embeddings or getattr(model, "lm_head", None) is not None:
        return
    from safetensors import safe_open

    from slipstream.layers.linear import Linear
    from slipstream.models.loader import checkpoint_files

    dtype = lm_head_weight(model).dtype
    for path in checkpoint_files(Path(cfg.model_dir)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if "lm_head.weight" in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                weight = f.get_tensor("lm_head.weight")
                break
    else:
        raise ModelLoadError(
            f"checkpoint in {cfg.model_dir} has tie_word_embeddings=false but no lm_head.weight: "
            "it cannot generate text"
        )
    if tuple(weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelLoadError(
            f"lm_head.weight has shape {tuple(weight.shape)}, expected "
            f"{(cfg.vocab_size, cfg.hidden_size)}"
        )
    with torch.device("meta"):  # no throwaway host allocation of a [vocab, hidden] matrix
        head = Linear(cfg.hidden_size, cfg.vocab_size)
    head.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    model.lm_head = head


class GenerationRunner:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        pool: KVPool,
        device: torch.device,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.pool = pool
        self.device = device
        self.graphs: DecodeCudaGraphs | None = None  # set by the engine when enabled
        self.use_graphs = False
        self.graph_replays = 0

    def metadata(self, batch: GenerationBatch) -> PagedAttentionMetadata:
        return build_paged_metadata(
            extend_lens=batch.extend_lens,
            prefix_lens=batch.prefix_lens,
            page_tables=list(batch.page_tables),
            slot_mapping=batch.slot_mapping,
            k_caches=self.pool.k_caches,
            v_caches=self.pool.v_caches,
            page_size=self.pool.page_size,
            device=self.device,
            is_decode=batch.phase is Phase.DECODE,
            num_kv_heads=self.model_config.num_kv_heads,
        )

    def _host_to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward(self, batch: GenerationBatch) -> torch.Tensor:
        """Logits [len(batch.sample_rows), vocab] (model dtype) of the rows that sample."""
        if (
            batch.phase is Phase.DECODE
            and self.use_graphs
            and self.graphs is not None
            and self.graphs.can_run(batch)
        ):
            self.graph_replays += 1
            logits = self.graphs.replay(batch)  # [B, vocab], every decode row samples
            return (
                logits
                if len(batch.sample_rows) == batch.num_seqs
                else logits[list(batch.sample_rows)]
            )
        ids = self._host_to_device(batch.token_ids)
        pos = self._host_to_device(batch.positions)
        meta = self.metadata(batch)
        hidden = self.model(ids, pos, meta)  # [T, hidden]
        if not batch.sample_rows:
            return hidden.new_empty(0, self.model_config.vocab_size)
        if batch.phase is Phase.DECODE and len(batch.sample_rows) == batch.num_seqs:
            last = hidden  # one token per sequence, all sample
        else:
            rows = [batch.cu_seqlens[r + 1] - 1 for r in batch.sample_rows]
            last = hidden[self._host_to_device(rows)]
        return self.model.logits(last)  # type: ignore[operator,no-any-return]
