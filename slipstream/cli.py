"""Command line: ``slipstream <command>`` (same as ``python -m slipstream <command>``).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and imports
its heavy dependencies inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

# command name -> (module, help). Modules are imported only for the command that runs
# (and for --help of that command).
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "slipstream.server.cli",
        "OpenAI-compatible HTTP server: embeddings and text generation",
    ),
    "profile-copies": (
        "slipstream.bench.profile_copies",
        "count device-to-device copies per layer in one forward pass",
    ),
    "bench": ("slipstream.bench.cli", "throughput benchmarks against a baseline"),
}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--attention-backend", default=None, help="torch or flash")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-input-tokens", type=int, default=None)
    add_quantization_args(p)
    add_cuda_graph_arg(p)


def add_cuda_graph_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run embedding forwards and decode steps eagerly, without CUDA graphs",
    )


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    from slipstream.config import DEFAULT_FP8_SKIP_LAYERS

    p.add_argument(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="fp8: float8 weights and per-token activations (CUDA, Hopper)",
    )
    p.add_argument(
        "--fp8-skip-layers",
        type=int,
        default=DEFAULT_FP8_SKIP_LAYERS,
        help=f"with fp8: leading decoder layers kept in the model dtype "
        f"(default {DEFAULT_FP8_SKIP_LAYERS})",
    )


# Engine keyword arguments that commands take from the same-named argparse options.
ENGINE_OPTIONS = (
    "model", "device", "dtype", "attention_backend", "max_batch_tokens", "max_input_tokens",
    "quantization", "fp8_skip_layers", "kv_cache_gb", "page_size", "chunked_prefill_tokens",
    "disable_prefix_cache", "disable_cuda_graph",
)  # fmt: skip


def engine_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """An Engine from whichever of ENGINE_OPTIONS the command defines (one place for all)."""
    from slipstream import Engine

    kwargs = {name: getattr(args, name) for name in ENGINE_OPTIONS if hasattr(args, name)}
    kwargs.update(overrides)
    return Engine(**kwargs)


def _embed_parser(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed texts and print the vectors or a cosine table")
    p.add_argument("texts", nargs="+", help="texts to embed")
    _add_engine_args(p)
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka truncation")
    p.add_argument("--prompt-name", default=None, help="a prompt from the model's config")
    p.add_argument("--no-normalize", action="store_true", help="return raw pooled vectors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    engine = engine_from_args(args)
    vecs = engine.embed(
        args.texts,
        normalize=not args.no_normalize,
        dimensions=args.dimensions,
        prompt_name=args.prompt_name,
        show_progress=False,
    )
    if args.json:
        payload = {
            "model": str(engine.model_dir),
            "dimensions": int(vecs.shape[1]),
            "embeddings": [[float(x) for x in v] for v in vecs],
        }
        print(json.dumps(payload))
        return 0
    print(f"model: {engine.model_dir}")
    print(
        f"{len(vecs)} vector(s) of {vecs.shape[1]} dimensions "
        f"(device {engine.config.device}, backend {engine.config.attention_backend})"
    )
    if len(vecs) == 1:
        v = vecs[0]
        print(
            f"norm {np.linalg.norm(v):.4f}; first values: " + " ".join(f"{x:+.4f}" for x in v[:8])
        )
        return 0
    unit = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    labels = [t if len(t) <= 40 else t[:37] + "..." for t in args.texts]
    print("\npairwise cosine similarity:")
    width = max(len(x) for x in labels)
    print(" " * (width + 2) + " ".join(f"{i:>6d}" for i in range(len(labels))))
    for i, lab in enumerate(labels):
        print(f"{lab:<{width}}  " + " ".join(f"{c:6.3f}" for c in cos[i]) + f"  [{i}]")
    return 0


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text continuations of prompts (Qwen3)")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    _add_engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV cache size (default: free GPU memory after a warm-up forward)",
    )
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument(
        "--chunked-prefill-tokens",
        type=int,
        default=8192,
        help="token budget of one forward; longer prompts are prefilled in chunks",
    )
    p.add_argument("--disable-prefix-cache", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    outs = engine.generate(
        args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    if args.json:
        print(json.dumps([
            {"prompt": p, "text": o.text, "token_ids": o.token_ids,
             "finish_reason": o.finish_reason}
            for p, o in zip(args.prompts, outs, strict=False)
        ]))  # fmt: skip
        return 0
    for p, o in zip(args.prompts, outs, strict=False):
        print(f"--- {p!r} -> ({len(o.token_ids)} tokens, {o.finish_reason})")
        print(f"{p}{o.text}")
    return 0


def _checkpoint_parser(sub: Any) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random-weights Qwen3 checkpoint")
    p.add_argument("--preset", required=True, choices=["qwen3-tiny", "qwen3-0.6b"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--layout",
        default="causal-lm",
        choices=["causal-lm", "model"],
        help="causal-lm: Qwen3ForCausalLM keys under model.; model: Qwen3Model",
    )
    p.add_argument("--untied", action="store_true", help="separate lm_head weights")
    p.set_defaults(func=_run_checkpoint)


def _run_checkpoint(args: argparse.Namespace) -> int:
    from slipstream.checkpoint import make_checkpoint

    out = make_checkpoint(
        args.preset,
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        layout=args.layout,
        tie_word_embeddings=False if args.untied else None,
    )
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _embed_parser(sub)
    _generate_parser(sub)
    _checkpoint_parser(sub)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the command that runs
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.version:
        from slipstream import __version__

        print(f"slipstream {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from slipstream.errors import SlipstreamError

    try:
        return int(args.func(args) or 0)
    except SlipstreamError as e:
        print(f"slipstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
