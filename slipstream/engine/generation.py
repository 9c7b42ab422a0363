"""GenerationEngine: continuous-batching text generation over a paged KV cache.

The step API (for a server that streams)::

    gen = engine.generation_engine()               # created lazily, allocates the KV pool
    rid = gen.add_request(prompt_ids, SamplingParams(max_new_tokens=64), detokenize=True)
    while gen.has_unfinished():
        for out in gen.step():                     # one forward + sampling
            send(out.request_id, out.new_token_ids, out.new_text)
            if out.finished:
                close(out.request_id, out.output.finish_reason)

``Engine.generate`` is the offline wrapper around it. Not thread-safe: one thread drives
``add_request`` / ``step`` / ``abort`` (a server's engine loop).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slipstream.attention.base import AttentionMetadata
from slipstream.config import ModelConfig
from slipstream.engine.batch import Phase
from slipstream.engine.cuda_graph import GRAPH_SAFE_BACKENDS, DecodeCudaGraphs
from slipstream.engine.gen_config import GenerationConfig
from slipstream.engine.gen_request import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationOutput,
    IncrementalDetokenizer,
    Request,
    RequestStatus,
    StepOutput,
)
from slipstream.engine.gen_runner import GenerationRunner, attach_lm_head
from slipstream.engine.gen_scheduler import GenerationScheduler
from slipstream.errors import ConfigError, InputError
from slipstream.kv.allocator import PageAllocator
from slipstream.kv.pool import GIB, KVPool, kv_bytes_per_token
from slipstream.kv.radix import RadixCache
from slipstream.sampling import SamplingBatch, SamplingParams, sample

logger = logging.getLogger("slipstream")

CPU_DEFAULT_KV_GB = 0.5
# Kept free on the GPU beyond the measured activations: CUDA graphs' pools, allocator slack.
GPU_EXTRA_RESERVE_BYTES = 512 * 1024**2


def load_generation_tokenizer(model_dir: Path) -> Any | None:
    """The checkpoint's tokenizer for generation prompts: no truncation, no padding.

    Prompts are encoded without the post-processor's special tokens (Qwen3 adds no BOS; an
    embedding-style post-processor would append ``<|endoftext|>``, which a prompt must not end
    with)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


class GenerationEngine:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str,
        config: GenerationConfig | None = None,
        tokenizer: Any | None = None,
        debug_checks: bool = False,
    ) -> None:
        if model_config.arch != "qwen3":
            raise ConfigError(
                f"text generation needs a causal LM (qwen3); {model_config.model_dir} is a "
                f"{model_config.arch} model"
            )
        self.config = config or GenerationConfig()
        self.model: Any = model  # Qwen3Model (forward + logits)
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_position_embeddings
        self.debug_checks = debug_checks
        attach_lm_head(model, model_config, device)

        ps = self.config.page_size
        num_pages, how = self._pool_pages()
        self.pool = KVPool(
            model_config.num_layers, num_pages, ps, model_config.num_kv_heads,
            model_config.head_dim, dtype, device,
        )  # fmt: skip
        logger.info("%s (%s)", self.pool.describe(), how)
        self.allocator = PageAllocator(num_pages, reserved=1)
        self.radix = None if self.config.disable_prefix_cache else RadixCache(ps, self.allocator)
        self.scheduler = GenerationScheduler(
            self.config, self.allocator, self.radix, ps, debug_checks=debug_checks
        )
        self.runner = GenerationRunner(model, model_config, self.pool, device)
        self.cuda_graphs_enabled = False
        if self._want_graphs(attention_backend):
            graphs = DecodeCudaGraphs(
                model, model_config, self.pool, device,
                min(self.config.cuda_graph_max_batch_size, self.config.max_running_requests),
                self.max_model_len,
            )  # fmt: skip
            graphs.capture()
            self.runner.graphs = graphs
            self.set_cuda_graphs(True)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_finished = 0

    # ---------------------------------------------------------------- setup
    def _want_graphs(self, backend: str) -> bool:
        if self.config.disable_cuda_graph or self.device.type != "cuda":
            return False
        if self.debug_checks:
            logger.info("CUDA graphs off: debug_checks reads device memory inside the forward")
            return False
        if backend not in GRAPH_SAFE_BACKENDS:
            logger.info("CUDA graphs off: attention backend %r has no graph-safe decode", backend)
            return False
        return True

    def _pool_pages(self) -> tuple[int, str]:
        cfg = self.config
        ps = cfg.page_size
        per_page = kv_bytes_per_token(self.model_config, self.dtype) * ps
        if cfg.num_kv_pages is not None:
            return cfg.num_kv_pages, "num_kv_pages"
        if cfg.kv_cache_gb is not None:
            return max(2, int(cfg.kv_cache_gb * GIB // per_page)), "kv_cache_gb"
        if self.device.type != "cuda":
            # No reliable free-memory figure on CPU: a modest default, capped by what the
            # maximum number of running requests at full context could use.
            full = cfg.max_running_requests * (-(-self.max_model_len // ps)) + 1
            return max(2, min(int(CPU_DEFAULT_KV_GB * GIB // per_page), full)), "CPU default"
        budget = self._free_gpu_bytes_after_warmup()
        pages = int(budget // per_page)
        if pages < 2:
            raise ConfigError(
                f"not enough free GPU memory for a KV cache ({budget / GIB:.2f} GiB left after a "
                "warm-up forward); lower chunked_prefill_tokens or pass kv_cache_gb"
            )
        return pages, f"sized from free GPU memory after a warm-up forward, {budget / GIB:.2f} GiB"

    @torch.inference_mode()
    def _free_gpu_bytes_after_warmup(self) -> float:
        """Free memory minus what the largest forward (one full prefill chunk, plus logits and
        sampling for every running request) needs on top of the weights."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        n = min(self.config.chunked_prefill_tokens, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.int64, device=dev)
        pos = torch.arange(n, dtype=torch.int64, device=dev)
        # EMBED-style metadata: the same activations as a prefill chunk, no cache needed yet.
        meta = AttentionMetadata.from_seq_lens([n], causal=True, device=dev)
        hidden = self.model(ids, pos, meta)
        rows = min(self.config.max_running_requests, n)
        logits = self.model.logits(hidden[:rows])
        sb = SamplingBatch.build(
            [SamplingParams(temperature=1.0, top_p=0.9, seed=0)] * rows, [0] * rows, dev
        )
        sample(logits, sb)
        del hidden, logits
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        used_elsewhere = total - free  # weights, this process's cache, other processes
        limit = self.config.gpu_memory_fraction * total
        budget = limit - used_elsewhere - activations - GPU_EXTRA_RESERVE_BYTES
        logger.info(
            "GPU memory: %.2f GiB total, %.2f GiB in use, %.2f GiB peak activations in warm-up",
            total / GIB,
            used_elsewhere / GIB,
            activations / GIB,
        )
        return max(0.0, budget)

    def set_cuda_graphs(self, enabled: bool) -> None:
        """Turn decode graph replay on/off at runtime (the bench compares both)."""
        enabled = bool(enabled) and self.runner.graphs is not None
        self.cuda_graphs_enabled = enabled
        self.runner.use_graphs = enabled

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        detokenize: bool = False,
    ) -> str:
        """Queue a request; returns its id. ``detokenize=True`` streams text deltas in
        ``StepOutput.new_text`` (needs a tokenizer). Raises InputError on invalid input."""
        params = (params or SamplingParams()).with_seed()
        ids = [int(t) for t in prompt_token_ids]
        vocab = self.model_config.vocab_size
        if not ids:
            raise InputError("the prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(
                f"prompt token id {bad} is outside [0, {vocab}) (the model's vocabulary)",
                param="prompt",
            )
        if len(ids) >= self.max_model_len:
            raise InputError(
                f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate",
                param="prompt",
            )
        # Alone, the request must fit the pool (every token's K/V but the last sampled one).
        longest = min(len(ids) + params.max_new_tokens, self.max_model_len) - 1
        if -(-longest // self.pool.page_size) > self.allocator.num_usable:
            raise InputError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs "
                f"{longest} cached tokens, over the KV cache's {self.pool.capacity_tokens}; "
                "lower max_new_tokens or raise kv_cache_gb",
                param="max_new_tokens",
            )
        if (params.stop or detokenize) and self.tokenizer is None:
            raise InputError(
                "stop strings and text streaming need a tokenizer (the model has no "
                "tokenizer.json)",
                param="stop",
            )
        if request_id is None:
            request_id = f"gen-{next(self._arrivals)}-{random.getrandbits(32):08x}"
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use", param="request_id")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.model_config.eos_token_ids)
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            arrival=next(self._arrivals),
            stop_ids=frozenset(stop_ids),
            detokenize=detokenize,
        )
        if self.tokenizer is not None and (detokenize or params.stop):
            req.detok = IncrementalDetokenizer(self.tokenizer)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> GenerationOutput | None:
        """Stop a request now and free its pages; returns its output so far (None if unknown
        or already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.finish_reason = FINISH_ABORT
        self.scheduler.finish(req)
        return self._output(req)

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[StepOutput]:
        """Schedule one batch, run it, sample; returns one entry per request that got a token."""
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        batch, planned = scheduled
        logits = self.runner.forward(batch)
        self.scheduler.commit(planned)
        if not batch.sample_rows:
            return []
        reqs = [planned[r] for r in batch.sample_rows]
        sb = SamplingBatch.build(
            [r.params for r in reqs], [r.output_len for r in reqs], self.device
        )
        next_ids = sample(logits, sb).tolist()
        return [self._append(req, tok) for req, tok in zip(reqs, next_ids, strict=True)]

    def _append(self, req: Request, tok: int) -> StepOutput:
        req.token_ids.append(tok)
        p = req.params
        if tok in req.stop_ids:
            req.finish_reason, req.stop_reason = FINISH_STOP, tok
        elif req.output_len >= p.max_new_tokens or req.total_len >= self.max_model_len:
            req.finish_reason = FINISH_LENGTH
        if req.detok is not None and req.finish_reason != FINISH_STOP:
            # (a stop token never shows in the text)
            prev = len(req.detok.text)
            req.detok.push(req.output_token_ids)
            self._check_stop_strings(req, prev)
        if req.finish_reason is None:
            new_text = self._stream_delta(req) if req.detokenize else None
            return StepOutput(req.request_id, [tok], new_text, False)
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req)
        out = self._output(req)
        self.num_finished += 1
        new_text = None
        if req.detokenize and out.text is not None:
            # The rest of the final text, including anything held back so far.
            new_text = out.text[req.emitted_text_len :]
            req.emitted_text_len = len(out.text)
        return StepOutput(req.request_id, [tok], new_text, True, req.finish_reason, out)

    def _check_stop_strings(self, req: Request, prev_len: int) -> None:
        stops = req.params.stop
        if not stops or req.detok is None:
            return
        text = req.detok.text
        longest = max(len(s) for s in stops)
        start = max(0, prev_len - longest + 1)  # a new match must end in the new text
        best: tuple[int, str] | None = None
        for s in stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            req.detok.text = text[: best[0]]
            req.finish_reason, req.stop_reason = FINISH_STOP, best[1]

    def _stream_delta(self, req: Request) -> str:
        assert req.detok is not None
        text = req.detok.text
        visible = len(text)
        if req.params.stop and req.finish_reason is None:
            # Hold back a possible beginning of a stop string until it is decided.
            visible = max(req.emitted_text_len, len(text) - (max(map(len, req.params.stop)) - 1))
        delta = text[req.emitted_text_len : visible]
        req.emitted_text_len = visible
        return delta

    def _output(self, req: Request) -> GenerationOutput:
        text: str | None = None
        if self.tokenizer is not None:
            ids = req.output_token_ids
            if isinstance(req.stop_reason, int) and ids and ids[-1] == req.stop_reason:
                ids = ids[:-1]
            if isinstance(req.stop_reason, str) and req.detok is not None:
                text = req.detok.text  # already cut before the stop string
            else:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationOutput(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=list(req.output_token_ids),
            text=text,
            finish_reason=req.finish_reason or FINISH_ABORT,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens,
        )

    # ---------------------------------------------------------------- offline
    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[GenerationOutput]:
        """Run the given prompts to completion; outputs in input order."""
        if len(prompts) != len(params):
            raise InputError("one SamplingParams per prompt", param="prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        wanted = set(ids)
        done: dict[str, GenerationOutput] = {}
        try:
            while len(done) < len(ids):
                outs = self.step()
                if not outs and not self.scheduler.has_work():
                    raise RuntimeError("generation stalled with unfinished requests")
                for o in outs:
                    if o.finished and o.request_id in wanted:
                        assert o.output is not None
                        done[o.request_id] = o.output
        except BaseException:
            for rid in ids:  # leave no request (and no page) behind on error / Ctrl-C
                if rid not in done:
                    self.abort(rid)
            raise
        return [done[r] for r in ids]

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.scheduler.stats)
        s.update(
            num_kv_pages=self.pool.num_pages,
            page_size=self.pool.page_size,
            kv_cache_gib=self.pool.nbytes / GIB,
            free_kv_pages=self.allocator.num_free,
            prefix_cache_pages=self.radix.cached_pages if self.radix else 0,
            prefix_cache_enabled=self.radix is not None,
            cuda_graphs_enabled=self.cuda_graphs_enabled,
            cuda_graph_replays=self.runner.graph_replays,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_finished=self.num_finished,
        )
        return s


# ------------------------------------------------------------------------------------
# Profiler hook
# ------------------------------------------------------------------------------------


def run_decode_step_for_profile(
    engine: Any,
    batch_size: int,
    context_len: int,
    profile: Callable[[], AbstractContextManager[Any]] | AbstractContextManager[Any] | None = None,
    use_cuda_graph: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run exactly one DECODE step of ``batch_size`` sequences with ``context_len`` tokens of
    context each; only that step runs inside ``profile`` (a context manager such as a
    ``torch.profiler.profile(...)``, or a callable returning one). Prefill happens before,
    outside it.

    ``engine`` is an ``Engine`` (its generation machinery is created if needed) or a
    ``GenerationEngine``. Eager by default so every kernel of every layer shows up (a graph
    replay hides them). Returns what ran: phase, batch size, whether a graph was replayed.
    """
    gen: GenerationEngine = (
        engine.generation_engine() if hasattr(engine, "generation_engine") else engine
    )
    if context_len < 1 or batch_size < 1:
        raise ValueError("batch_size and context_len must be >= 1")
    if gen.has_unfinished():
        raise RuntimeError("the generation engine has requests in flight; profile it idle")
    rng = random.Random(seed)
    vocab = gen.model_config.vocab_size
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    rids = [
        gen.add_request([rng.randrange(vocab) for _ in range(context_len)], params)
        for _ in range(batch_size)
    ]
    was = gen.cuda_graphs_enabled
    gen.set_cuda_graphs(use_cuda_graph)
    try:
        # Prefill every sequence (one token each sampled): all now decode.
        while any(gen.requests[r].status is not RequestStatus.RUNNING
                  or gen.requests[r].remaining_len != 1 for r in rids):  # fmt: skip
            gen.step()
        replays = gen.runner.graph_replays
        if gen.device.type == "cuda":
            torch.cuda.synchronize(gen.device)
        if profile is None:
            ctx: AbstractContextManager[Any] = nullcontext()
        elif isinstance(profile, AbstractContextManager):
            ctx = profile  # an already built context manager (e.g. a torch.profiler.profile)
        else:
            ctx = profile()
        t0 = time.perf_counter()
        with ctx:
            decode_steps = gen.scheduler.stats["num_decode_steps"]
            outs = gen.step()
            if gen.device.type == "cuda":
                torch.cuda.synchronize(gen.device)
        elapsed = time.perf_counter() - t0
        assert gen.scheduler.stats["num_decode_steps"] == decode_steps + 1, "not a decode step"
        return {
            "phase": Phase.DECODE.value,
            "batch_size": len(outs),
            "context_len": context_len,
            "cuda_graph": gen.runner.graph_replays > replays,
            "seconds": elapsed,
        }
    finally:
        for r in rids:
            gen.abort(r)
        gen.set_cuda_graphs(was)
