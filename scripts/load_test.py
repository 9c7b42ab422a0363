#!/usr/bin/env python
"""Bounded load test of ``slipstream serve`` on loopback: requests/s and latency percentiles.

Starts ``python -m slipstream serve --port 0 [SERVER ARGS]`` (or uses ``--url`` of a server
already running on 127.0.0.1), warms it up, then keeps ``--concurrency`` clients busy with
short ``POST /v1/embeddings`` requests for ``--duration`` seconds or ``--max-requests``
requests, whichever comes first. Only loopback addresses are accepted.

    python scripts/load_test.py --duration 30 --concurrency 16
    python scripts/load_test.py --url http://127.0.0.1:8000 --duration 10
    python scripts/load_test.py --duration 30 -- --model /path/to/model --max-batch-tokens 8192

Prints one summary table (and ``--json PATH`` writes it as JSON). The client shares the
machine with the server: on a small CPU box the figures include the client's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

WORDS = (
    "the a of to in and is was for on with as by at from that this it not but model token "
    "vector search query document embedding engine packed batch sequence layer attention "
    "kernel memory fast quick brown fox jumps over lazy dog river mountain city house light"
).split()


def short_text(rng: random.Random, min_words: int, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))


def start_server(server_args: list[str], timeout: float) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "slipstream",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *server_args,
    ]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    found: dict[str, str] = {}
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "url" not in found:
                sys.stderr.write("  server: " + line)
            m = re.search(r"ready on (http://[\d.]+:\d+):", line)
            if m:
                found["url"] = m.group(1)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise SystemExit("the server did not become ready in time")
    return proc, found["url"]


def scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    out: dict[str, float] = {}
    for name in (
        "slipstream_batch_size_sum",
        "slipstream_batch_size_count",
        "slipstream_batch_requests_sum",
        "slipstream_batch_tokens_sum",
        "slipstream_prompt_tokens_total",
    ):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


async def run_load(args: argparse.Namespace, url: str, headers: dict[str, str]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    # a fixed pool of inputs, so every run sends the same mix
    pool = [
        [short_text(rng, args.min_words, args.max_words) for _ in range(args.inputs)]
        for _ in range(1024)
    ]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=limits
    ) as client:
        # warm-up (not measured)
        for i in range(min(20, len(pool))):
            await client.post("/v1/embeddings", json={"input": pool[i]})
        deadline = time.perf_counter() + args.duration

        async def worker(w: int) -> None:
            nonlocal sent
            i = w
            while time.perf_counter() < deadline and sent < args.max_requests:
                sent += 1
                body = {"input": pool[i % len(pool)], "encoding_format": args.encoding_format}
                i += args.concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/embeddings", json=body)
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                dt = time.perf_counter() - t0
                if status == "200":
                    latencies.append(dt)
                else:
                    errors[status] = errors.get(status, 0) + 1

        before = scrape(url, headers)
        t_start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        elapsed = time.perf_counter() - t_start
        after = scrape(url, headers)
    lat = np.asarray(latencies) * 1000.0
    d = {k: after[k] - before[k] for k in after}
    forwards = d["slipstream_batch_size_count"] or 1.0
    return {
        "requests_ok": len(latencies),
        "errors": errors,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "inputs_per_s": round(len(latencies) * args.inputs / elapsed, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p90": round(float(np.percentile(lat, 90)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
        },
        "server": {
            "forwards": int(d["slipstream_batch_size_count"]),
            "mean_inputs_per_forward": round(d["slipstream_batch_size_sum"] / forwards, 2),
            "mean_requests_per_forward": round(d["slipstream_batch_requests_sum"] / forwards, 2),
            "mean_tokens_per_forward": round(d["slipstream_batch_tokens_sum"] / forwards, 1),
            "prompt_tokens": int(d["slipstream_prompt_tokens_total"]),
        },
    }


def offline_baseline(args: argparse.Namespace, server_args: list[str]) -> dict[str, Any]:
    """The same inputs through the offline ``Engine.embed`` in this process (no HTTP), in
    batches of ``--concurrency`` requests' inputs: the engine's own rate on this machine."""
    import torch

    from slipstream import Engine

    opts = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--device", "--dtype", "--attention-backend"):
        opts.add_argument(flag, default=None)
    opts.add_argument("--max-batch-tokens", type=int, default=16384)
    opts.add_argument("--torch-threads", type=int, default=None)
    known, _ = opts.parse_known_args(server_args)
    engine = Engine(
        model=known.model,
        device=known.device,
        dtype=known.dtype,
        attention_backend=known.attention_backend,
        max_batch_tokens=known.max_batch_tokens,
    )
    if engine.config.device == "cpu":  # the same forward threads as the server
        from slipstream.server.cli import default_torch_threads

        torch.set_num_threads(known.torch_threads or default_torch_threads())
    rng = random.Random(args.seed)
    pool = [short_text(rng, args.min_words, args.max_words) for _ in range(1024 * args.inputs)]
    step = args.concurrency * args.inputs
    engine.embed(pool[:step], show_progress=False)  # warm-up
    done = 0
    t0 = time.perf_counter()
    seconds = min(args.duration, 10.0)
    while time.perf_counter() - t0 < seconds:
        start = done % (len(pool) - step)
        engine.embed(pool[start : start + step], show_progress=False)
        done += step
    elapsed = time.perf_counter() - t0
    return {
        "torch_threads": torch.get_num_threads(),
        "inputs_per_s": round(done / elapsed, 1),
        "batch_inputs": step,
        "elapsed_s": round(elapsed, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server on loopback (else start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--duration", type=float, default=30.0, help="seconds (at most 300)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many")
    p.add_argument("--concurrency", type=int, default=16, help="clients in flight")
    p.add_argument("--inputs", type=int, default=1, help="inputs per request")
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--encoding-format", default="float", choices=["float", "base64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the offline Engine.embed baseline (run after the server stops)",
    )
    p.add_argument("server_args", nargs="*", help="after --: flags for slipstream serve")
    args = p.parse_args()
    if not 0 < args.duration <= 300:
        p.error("--duration must be in (0, 300]")
    if args.concurrency < 1 or args.max_requests < 1:
        p.error("--concurrency and --max-requests must be >= 1")

    proc = None
    server_args = list(args.server_args)
    if args.url is None:
        if args.api_key:
            server_args += ["--api-key", args.api_key]
        proc, url = start_server(server_args, args.startup_timeout)
    else:
        url = args.url.rstrip("/")
        host = urlparse(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error("only loopback servers (127.0.0.1 / localhost) may be load-tested")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        result = asyncio.run(run_load(args, url, headers))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not args.no_baseline:
        base = offline_baseline(args, server_args)
        base["server_over_offline"] = round(result["inputs_per_s"] / base["inputs_per_s"], 3)
        result["offline_baseline"] = base
    result["config"] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "concurrency": args.concurrency,
        "inputs_per_request": args.inputs,
        "words_per_input": [args.min_words, args.max_words],
        "encoding_format": args.encoding_format,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, "
        f"{platform.system()} {platform.release()}",
        "server_exit_code": None if proc is None else proc.returncode,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    lat = result["latency_ms"]
    print(f"\nload test on {url} ({result['config']['machine']})")
    print(
        f"  requests ok      {result['requests_ok']} in {result['elapsed_s']} s; "
        f"errors {result['errors'] or 'none'}"
    )
    print(
        f"  throughput       {result['requests_per_s']} requests/s "
        f"({result['inputs_per_s']} inputs/s)"
    )
    print(
        f"  latency (ms)     p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
        f"mean {lat['mean']}"
    )
    s = result["server"]
    print(
        f"  server batching  {s['forwards']} forwards, {s['mean_inputs_per_forward']} inputs "
        f"/ {s['mean_requests_per_forward']} requests / {s['mean_tokens_per_forward']} "
        "tokens per forward"
    )
    if "offline_baseline" in result:
        b = result["offline_baseline"]
        print(
            f"  offline baseline {b['inputs_per_s']} inputs/s (Engine.embed, batches of "
            f"{b['batch_inputs']}, same inputs, no HTTP): server/offline = "
            f"{b['server_over_offline']}"
        )
    print(
        f"  load average     {result['config']['load_average_after']} (other processes "
        "share the machine)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
