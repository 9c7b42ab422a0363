"""Engine: the synchronous core and the offline API."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slipstream.attention.registry import default_backend, get_backend_class
from slipstream.config import (
    DEFAULT_FP8_SKIP_LAYERS,
    EngineConfig,
    ModelConfig,
    default_model_dir,
    parse_dtype,
)
from slipstream.engine.batch import Batch
from slipstream.engine.gen_config import (
    DEFAULT_CHUNKED_PREFILL_TOKENS,
    DEFAULT_MAX_RUNNING_REQUESTS,
    DEFAULT_PAGE_SIZE,
    GenerationConfig,
)
from slipstream.engine.runner import ModelRunner
from slipstream.engine.scheduler import pack_group, plan_embed_groups
from slipstream.errors import ConfigError, InputError
from slipstream.layers.pooler import postprocess
from slipstream.tokenization import Tokenizer, normalize_inputs, resolve_prompt

if TYPE_CHECKING:
    from slipstream.engine.gen_request import GenerationOutput
    from slipstream.engine.generation import GenerationEngine

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
        fp8_skip_layers: int = DEFAULT_FP8_SKIP_LAYERS,
        debug_checks: bool = False,
        disable_prefix_cache: bool = False,
        disable_cuda_graph: bool = False,
        kv_cache_gb: float | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        chunked_prefill_tokens: int = DEFAULT_CHUNKED_PREFILL_TOKENS,
        num_kv_pages: int | None = None,
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
            fp8_skip_layers=fp8_skip_layers,
            debug_checks=debug_checks,
            cuda_graphs=not disable_cuda_graph,
        )
        self.model_config = model_cfg
        self.model_dir = model_dir
        # Generation settings are validated now; the KV pool and the rest of the generation
        # machinery are created on the first generate() (embedding never allocates a cache).
        self.generation_config = GenerationConfig(
            page_size=page_size,
            kv_cache_gb=kv_cache_gb,
            num_kv_pages=num_kv_pages,
            chunked_prefill_tokens=chunked_prefill_tokens,
            max_running_requests=min(max_batch_size, DEFAULT_MAX_RUNNING_REQUESTS),
            disable_prefix_cache=disable_prefix_cache,
            disable_cuda_graph=disable_cuda_graph,
        )
        self._generation: GenerationEngine | None = None
        self.tokenizer: Tokenizer | None = None
        if (model_dir / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(model_dir, self.config.max_input_tokens)
        self.runner = ModelRunner(self.config)
        logger.info(
            "slipstream engine ready: model=%s device=%s dtype=%s backend=%s",
            model_dir,
            dev,
            str(self.config.dtype).removeprefix("torch."),
            backend,
        )

    # ---------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        return self.model_config.hidden_size

    @property
    def max_input_tokens(self) -> int:
        return self.config.max_input_tokens

    @property
    def supports_generation(self) -> bool:
        """Whether ``generate`` can run on this model (decoders with an LM head: Qwen3)."""
        return self.model_config.arch == "qwen3"

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
            for i, ids in zip(text_idx, self.tokenizer.encode_batch(texts, truncate), strict=False):
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
        # Plan now, pack each forward just before it runs: packing then overlaps the GPU work
        # of the forwards already queued instead of delaying the first one.
        groups = plan_embed_groups(seqs, self.config.max_batch_tokens, self.config.max_batch_size)
        dim = self.hidden_size if dimensions is None else int(dimensions)
        result = np.empty((len(seqs), dim), dtype=np.float32)
        if show_progress is None:
            show_progress = len(groups) > 1
        progress = None
        if show_progress and len(groups) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(seqs), desc="embedding", unit="input")
        # On CUDA, results stay on the device and come back a few forwards at a time: a
        # per-forward read-back would make the host wait for the GPU before it can pack and
        # launch the next forward, leaving the GPU idle in between.
        flush_every = 8 if self.runner.device.type == "cuda" else 1
        pending: list[tuple[tuple[int, ...], torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            ids = [i for item_ids, _ in pending for i in item_ids]
            vecs = torch.cat([v for _, v in pending])
            if vecs.is_cuda:
                # Through pinned memory: a pageable read-back runs at a fraction of the bus
                # speed (9 ms of the 213 ms of device time on the `short` workload).
                host = torch.empty(vecs.shape, dtype=vecs.dtype, pin_memory=True)
                host.copy_(vecs)
                vecs = host
            result[ids] = vecs.numpy()
            pending.clear()
            if progress is not None:
                progress.update(len(ids))

        try:
            for group in groups:
                batch = pack_group(seqs, group)
                pooled = self.runner.embed(batch)
                pending.append((batch.item_ids, postprocess(pooled, normalize, dimensions)))
                if len(pending) >= flush_every:
                    flush()
            flush()
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

    # ---------------------------------------------------------------- generation
    def generation_engine(self) -> GenerationEngine:
        """The generation machinery (paged KV pool, scheduler, CUDA graphs), created on first
        use. Its ``add_request`` / ``step`` API is what a streaming server drives."""
        if self._generation is None:
            from slipstream.engine.generation import GenerationEngine, load_generation_tokenizer

            self._generation = GenerationEngine(
                self.runner.model,
                self.model_config,
                device=self.config.torch_device,
                dtype=self.config.dtype,
                attention_backend=self.config.attention_backend,
                config=self.generation_config,
                tokenizer=load_generation_tokenizer(self.model_dir),
                debug_checks=self.config.debug_checks,
            )
        return self._generation

    def generate(
        self,
        prompts: Any,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | Sequence[str] | None = None,
        seed: int | Sequence[int] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> list[GenerationOutput]:
        """Generate continuations of ``prompts`` (a string, strings, or token-id lists).

        ``temperature=0`` is greedy. ``seed`` (one for all prompts, or one per prompt) makes
        sampling reproducible per request whatever the batching. Returns one
        ``GenerationOutput`` per prompt, in input order.
        """
        from slipstream.sampling import SamplingParams

        items = normalize_inputs(prompts)
        gen = self.generation_engine()
        seqs: list[list[int]] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if gen.tokenizer is None:
                    raise InputError(
                        f"the model in {self.model_dir} has no tokenizer.json: give token ids",
                        param="prompt",
                    )
                ids = list(gen.tokenizer.encode(item, add_special_tokens=False).ids)
                if not ids:
                    raise InputError(f"prompt {i} tokenizes to no tokens", param="prompt")
                seqs.append(ids)
            else:
                seqs.append(list(item))
        if seed is None or isinstance(seed, int):
            seeds: list[int | None] = [seed] * len(seqs)
        else:
            seeds = list(seed)
            if len(seeds) != len(seqs):
                raise InputError(
                    f"{len(seeds)} seeds for {len(seqs)} prompts: give one seed or one per prompt",
                    param="seed",
                )
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = [
            SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=s,
                stop=stops,
                stop_token_ids=tuple(stop_token_ids or ()),
                ignore_eos=ignore_eos,
            )
            for s in seeds
        ]
        return gen.generate(seqs, params)

    def generation_stats(self) -> dict[str, Any]:
        """Counters of the generation machinery (empty before the first generate)."""
        return {} if self._generation is None else self._generation.stats()
