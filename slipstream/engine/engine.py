"""Engine: the synchronous core and the offline API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream.attention.registry import default_backend, get_backend_class
from slipstream.config import EngineConfig, ModelConfig, default_model_dir, parse_dtype
from slipstream.engine.batch import Batch
from slipstream.engine.runner import ModelRunner
from slipstream.engine.scheduler import plan_embed_batches
from slipstream.errors import ConfigError, InputError
from slipstream.layers.pooler import postprocess
from slipstream.tokenization import Tokenizer, normalize_inputs, resolve_prompt

logger = logging.getLogger("slipstream")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


class Engine:
    """Packed, padding-free embedding engine.

    >>> engine = Engine()                      # the packaged all-MiniLM-L6-v2 on CPU
    >>> engine.embed(["a sentence", "another"]).shape
    (2, 384)
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        attention_backend: str | None = None,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 512,
        max_input_tokens: int | None = None,
        quantization: str | None = None,
        debug_checks: bool = False,
    ) -> None:
        model_dir = default_model_dir() if model is None else Path(model)
        model_cfg = ModelConfig.from_hf(model_dir)
        dev = resolve_device(device)
        if dtype is None:
            dtype = "bfloat16" if dev.startswith("cuda") else "float32"
        backend = attention_backend or default_backend(dev)
        get_backend_class(backend)  # fail early, naming the available ones
        if quantization == "fp8" and not dev.startswith("cuda"):
            raise ConfigError("quantization='fp8' needs a CUDA device (torch._scaled_mm)")
        self.config = EngineConfig(
            model=model_cfg,
            device=dev,
            dtype=parse_dtype(dtype),
            attention_backend=backend,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            max_input_tokens=max_input_tokens or model_cfg.default_max_input_tokens,
            quantization=quantization,
            debug_checks=debug_checks,
        )
        self.model_config = model_cfg
        self.model_dir = model_dir
        self.tokenizer: Tokenizer | None = None
        if (model_dir / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(model_dir, self.config.max_input_tokens)
        self.runner = ModelRunner(self.config)
        logger.info(
            "slipstream engine ready: model=%s device=%s dtype=%s backend=%s",
            model_dir, dev, str(self.config.dtype).removeprefix("torch."), backend,
        )

    # ---------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        return self.model_config.hidden_size

    @property
    def max_input_tokens(self) -> int:
        return self.config.max_input_tokens

    # ---------------------------------------------------------------- validation
    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)):
            raise InputError(
                f"dimensions must be an integer, got {type(dimensions).__name__}",
                param="dimensions",
            )
        if not 1 <= int(dimensions) <= self.hidden_size:
            raise InputError(
                f"dimensions must be between 1 and {self.hidden_size} (the model's hidden size), "
                f"got {dimensions}",
                param="dimensions",
            )

    def tokenize(
        self,
        inputs: Any,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate: bool = True,
    ) -> list[list[int]]:
        """Validate and tokenize: one token-id list per input. Raises InputError."""
        items = normalize_inputs(inputs)
        prefix = resolve_prompt(prompt_name, prompt, self.model_config.prompts)
        texts: list[str] = []
        text_idx: list[int] = []
        out: list[list[int] | None] = [None] * len(items)
        limit = self.config.max_input_tokens
        vocab = self.model_config.vocab_size
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item == "":
                    raise InputError(f"input {i} is an empty string", param="input")
                texts.append(item if prefix is None else prefix + item)
                text_idx.append(i)
                continue
            if not item:
                raise InputError(f"input {i} is an empty token list", param="input")
            if prefix is not None:
                raise InputError(
                    "prompt_name / prompt apply to text inputs only, not to token ids",
                    param="prompt_name",
                )
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise InputError(
                    f"input {i}: token id {bad} is outside [0, {vocab}) (the model's vocabulary)",
                    param="input",
                )
            if len(item) > limit:
                if not truncate:
                    raise InputError(
                        f"input {i} has {len(item)} tokens, over max_input_tokens={limit}; "
                        "shorten it or enable truncation",
                        param="input",
                    )
                item = item[:limit]
            out[i] = item
        if texts:
            if self.tokenizer is None:
                raise InputError(
                    f"the model in {self.model_dir} has no tokenizer.json: give token ids, not text",
                    param="input",
                )
            for i, ids in zip(text_idx, self.tokenizer.encode_batch(texts, truncate)):
                if not ids:
                    raise InputError(f"input {i} tokenizes to no tokens", param="input")
                out[i] = ids
        return [o for o in out if o is not None]

    # ---------------------------------------------------------------- embedding
    def embed_token_ids(
        self,
        seqs: list[list[int]],
        normalize: bool = True,
        dimensions: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed already validated token-id lists; float32 [N, D] in input order."""
        self.check_dimensions(dimensions)
        batches = plan_embed_batches(
            seqs, self.config.max_batch_tokens, self.config.max_batch_size
        )
        dim = self.hidden_size if dimensions is None else int(dimensions)
        result = np.empty((len(seqs), dim), dtype=np.float32)
        if show_progress is None:
            show_progress = len(batches) > 1
        progress = None
        if show_progress and len(batches) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(seqs), desc="embedding", unit="input")
        try:
            for batch in batches:
                vecs = self.run_batch(batch, normalize, dimensions)
                result[list(batch.item_ids)] = vecs
                if progress is not None:
                    progress.update(batch.num_seqs)
        finally:
            if progress is not None:
                progress.close()
        return result

    def run_batch(self, batch: Batch, normalize: bool, dimensions: int | None) -> np.ndarray:
        pooled = self.runner.embed(batch)
        return postprocess(pooled, normalize, dimensions).cpu().numpy()

    def embed(
        self,
        inputs: Any,
        normalize: bool = True,
        dimensions: int | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        show_progress: bool | None = None,
        prompt: str | None = None,
    ) -> np.ndarray:
        """Embeddings for ``inputs`` (a string, strings, or token-id lists): float32 [N, D].

        ``show_progress=None`` shows a progress bar when there is more than one forward and
        stderr is a terminal; True forces it whenever there is more than one forward.
        """
        self.check_dimensions(dimensions)
        seqs = self.tokenize(inputs, prompt_name=prompt_name, prompt=prompt, truncate=truncate)
        return self.embed_token_ids(seqs, normalize, dimensions, show_progress)
