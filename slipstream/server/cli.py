"""``slipstream serve``: the OpenAI-compatible embedding and text generation server.

Top-level imports stay light (argparse only) so that ``slipstream --help`` and
``slipstream serve --help`` do not import torch, fastapi or uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from slipstream.cli import add_cuda_graph_arg, add_quantization_args

logger = logging.getLogger("slipstream.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve embeddings and text generation over HTTP: POST /v1/embeddings, "
        "POST /v1/completions, POST /v1/chat/completions (OpenAI), POST /embed, "
        "POST /tokenize, GET /v1/models, GET /health, GET /metrics."
    )
    p.add_argument(
        "--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port (default 8000; 0 picks a free one, logged when ready)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--attention-backend", default=None, help="torch or flash")
    add_quantization_args(p)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and /metrics",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="most tokens in one forward pass, over all requests (default 16384)",
    )
    p.add_argument(
        "--max-client-batch-size",
        type=int,
        default=2048,
        help="most inputs in one request; 413 above (default 2048)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=8192,
        help="most inputs in flight over all requests; 429 above (default 8192)",
    )
    p.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="longest input in tokens (default: the model's max_seq_length)",
    )
    p.add_argument(
        "--auto-truncate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="truncate over-long inputs instead of answering 400 (default: off)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists "
        "(default: the model folder's name, or all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--payload-limit",
        type=int,
        default=2_000_000,
        help="largest request body in bytes; 413 above (default 2000000)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish after SIGTERM/SIGINT (default 30)",
    )
    p.add_argument(
        "--tokenizer-threads",
        type=int,
        default=1,
        help="threads that tokenize requests (default 1)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads for the forward pass (default on CPU: the usable cores minus one, "
        "at least 1, leaving a core for HTTP and tokenization)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    g = p.add_argument_group("text generation (Qwen3 models; created on the first request)")
    g.add_argument(
        "--max-completion-tokens",
        type=int,
        default=None,
        help="most tokens one request may generate (max_tokens); 400 above. Also caps the "
        "defaults (16 for completions, the rest of the context for chat). Default: no limit "
        "but the model's context",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file to use instead of the model's own",
    )
    g.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV cache size in GiB (default: free GPU memory after a warm-up; 0.5 on CPU)",
    )
    g.add_argument(
        "--disable-prefix-cache", action="store_true", help="turn the radix prefix cache off"
    )
    add_cuda_graph_arg(g)


def default_torch_threads() -> int:
    """Usable cores minus one (for the event loop and the tokenizer), at least 1.

    On a small or shared CPU box an intra-op pool as wide as the machine competes with the
    server's own threads; the forward then stalls at every parallel region.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def run(args: argparse.Namespace) -> int:
    from slipstream.errors import ConfigError
    from slipstream.server.app import make_server
    from slipstream.server.settings import DEFAULT_SERVED_MODEL_NAME, ServerSettings

    name = args.served_model_name
    if name is None:
        name = (
            DEFAULT_SERVED_MODEL_NAME
            if args.model is None
            else (Path(args.model).resolve().name or str(args.model))
        )
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template: cannot read {args.chat_template}: {e}") from e
    # Settings first: a bad flag fails before the model loads.
    settings = ServerSettings(
        served_model_name=name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_client_batch_size=args.max_client_batch_size,
        max_concurrent_requests=args.max_concurrent_requests,
        payload_limit=args.payload_limit,
        auto_truncate=args.auto_truncate,
        shutdown_timeout=args.shutdown_timeout,
        tokenizer_threads=args.tokenizer_threads,
        access_log=args.access_log,
        max_completion_tokens=args.max_completion_tokens,
        chat_template=chat_template,
    )
    from slipstream.cli import engine_from_args

    engine = engine_from_args(args)
    if engine.config.device == "cpu":
        import torch

        threads = args.torch_threads or default_torch_threads()
        torch.set_num_threads(threads)
        logger.info("forward pass on %d CPU thread(s)", threads)
    server = make_server(engine, settings)
    server.run()
    if not server.started:
        logger.error("the server did not start (see the error above)")
        return 1
    return 0
