"""The baseline: Hugging Face transformers, used the way people usually serve embeddings.

``AutoModel.from_pretrained(dir, dtype=..., attn_implementation="sdpa")`` in eval mode on
the same device and dtype as slipstream, under ``torch.inference_mode()``; inputs sorted by
length (longest first) and padded per batch. Decoder models (last-token pooling) are padded
on the left with an attention mask, and pooled at the last position; their position ids are
counted from the first real token (as slipstream does), and no KV cache is built. Encoder
models (BERT: mean or CLS pooling) are padded on the right and mean-pooled over the mask.
Vectors are L2-normalised in float32.

transformers is imported only here, and only when a baseline is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream.config import ModelConfig


class HFBaseline:
    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device,
        dtype: torch.dtype,
        model_config: ModelConfig | None = None,
    ) -> None:
        import transformers
        from transformers import AutoModel

        self.model_dir = Path(model_dir)
        self.cfg = model_config or ModelConfig.from_hf(self.model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pooling = self.cfg.pooling.mode
        self.left_pad = self.pooling == "last"
        self.transformers_version = transformers.__version__
        kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
        try:
            model = AutoModel.from_pretrained(self.model_dir, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModel.from_pretrained(self.model_dir, torch_dtype=dtype, **kwargs)
        self.model = model.to(self.device).eval()
        self.pad_id = 0

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def batches(self, seqs: list[list[int]], batch_size: int) -> list[list[int]]:
        """Item indices of each batch: sorted by length, longest first."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    @torch.inference_mode()
    def embed(
        self,
        seqs: list[list[int]],
        batch_size: int,
        normalize: bool = True,
    ) -> np.ndarray:
        """float32 [N, hidden] in input order."""
        out = np.zeros((len(seqs), self.cfg.hidden_size), dtype=np.float32)
        for idx in self.batches(seqs, batch_size):
            out[idx] = self.forward([seqs[i] for i in idx], normalize)
        return out

    def forward(self, batch: list[list[int]], normalize: bool = True) -> np.ndarray:
        b = len(batch)
        width = max(len(s) for s in batch)
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for r, s in enumerate(batch):
            if self.left_pad:
                ids[r, width - len(s) :] = s
                mask[r, width - len(s) :] = 1
            else:
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
        ids_t = torch.from_numpy(ids).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
        extra: dict[str, Any] = {}
        if self.cfg.arch == "qwen3":
            extra["position_ids"] = (mask_t.cumsum(-1) - 1).clamp(min=0)
            extra["use_cache"] = False
        hidden = self.model(input_ids=ids_t, attention_mask=mask_t, **extra).last_hidden_state
        if self.pooling == "last":
            pooled = hidden[:, -1].float()  # left padding: every row ends at the last column
        elif self.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            m = mask_t.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.cpu().numpy()
