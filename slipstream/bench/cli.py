"""``slipstream bench <embed|generate>``: throughput benchmarks against a baseline.

``embed`` lives in slipstream.bench.embed_bench. ``generate`` lives in
slipstream.bench.generate_bench, which is imported here (argparse needs its arguments up
front) but may be missing from a checkout: then ``bench generate`` says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

GENERATE_MODULE = "slipstream.bench.generate_bench"


def _load_generate() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it is unavailable)."""
    try:
        return importlib.import_module(GENERATE_MODULE), None
    except ModuleNotFoundError as e:
        if e.name == GENERATE_MODULE:
            return None, f"{GENERATE_MODULE} is not in this checkout"
        return None, f"{GENERATE_MODULE} failed to import: {e!r}"
    except ImportError as e:
        return None, f"{GENERATE_MODULE} failed to import: {e!r}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slipstream.bench import embed_bench

    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    p = sub.add_parser("embed", help="embedding throughput vs transformers (same process)")
    embed_bench.add_arguments(p)

    gen, why = _load_generate()
    if gen is not None:
        g = sub.add_parser("generate", help="generation throughput benchmark")
        gen.add_arguments(g)
    else:
        g = sub.add_parser(
            "generate", help="generation throughput benchmark (unavailable)", add_help=False
        )
        g.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        g.set_defaults(generate_unavailable=why)

        # Accept whatever options were meant for the missing module, so that run() can say
        # why it is unavailable instead of argparse complaining about "--model".
        def swallow(
            args: list[str] | None = None, namespace: argparse.Namespace | None = None
        ) -> tuple[argparse.Namespace, list[str]]:
            ns = namespace if namespace is not None else argparse.Namespace()
            ns.generate_unavailable = why
            return ns, []

        g.parse_known_args = swallow  # type: ignore[method-assign,assignment]


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "bench_command", None)
    if cmd == "embed":
        from slipstream.bench import embed_bench

        return int(embed_bench.run(args) or 0)
    if cmd == "generate":
        why = getattr(args, "generate_unavailable", None)
        if why is not None:
            print(f"slipstream bench generate: unavailable: {why}", file=sys.stderr)
            return 2
        gen = importlib.import_module(GENERATE_MODULE)
        return int(gen.run(args) or 0)
    print(
        "usage: slipstream bench {embed,generate} ... (see slipstream bench --help)",
        file=sys.stderr,
    )
    return 2
