"""Text generation over HTTP: /v1/completions and /v1/chat/completions on a live server.

One live uvicorn on loopback serves a random qwen3-tiny checkpoint (fp32, CPU, with a
tokenizer and a chat template). Its answers are compared with the offline
``Engine.generate`` of a second engine on the same checkpoint: greedy token for token,
seeded sampling too. Small apps without a live server (starlette's TestClient) cover the
BERT model and the lazy KV pool; ``AsyncEngine`` itself covers draining, and the real
``python -m slipstream serve`` in a subprocess covers SIGTERM during a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from slipstream import Engine

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")

from slipstream.sampling import SamplingParams  # noqa: E402
from slipstream.server.async_engine import AsyncEngine, EngineStopped  # noqa: E402
from slipstream.server.settings import ServerSettings  # noqa: E402
from slipstream.server.testing import LiveServer  # noqa: E402

KEY = "gen-key"
NAME = "qwen3-tiny"
CONTEXT = 2048  # the preset's max_position_embeddings
VOCAB = 1024
MAX_CLIENT_BATCH = 4
MAX_IN_FLIGHT = 16
MAX_COMPLETION = 1900
PAYLOAD_LIMIT = 100_000
KV_PAGES = 384  # 16-token pages: 6128 tokens, a few small KV pools rather than 0.25 GiB each
PROMPTS = ["hello world", "The quick brown fox jumps", "Seven river mountain data"]


@pytest.fixture(scope="module")
def live(tiny_qwen3: Path) -> Iterator[LiveServer]:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", num_kv_pages=KV_PAGES)
    settings = ServerSettings(
        served_model_name=NAME,
        api_key=KEY,
        max_client_batch_size=MAX_CLIENT_BATCH,
        max_concurrent_requests=MAX_IN_FLIGHT,
        payload_limit=PAYLOAD_LIMIT,
        shutdown_timeout=5,
        max_completion_tokens=MAX_COMPLETION,
    )
    with LiveServer(engine, settings) as server:
        yield server


@pytest.fixture(scope="module")
def offline(tiny_qwen3: Path) -> Engine:
    """A second engine on the same checkpoint: the reference (the server's is its own)."""
    return Engine(tiny_qwen3, device="cpu", dtype="float32", num_kv_pages=KV_PAGES)


@pytest.fixture()
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
        yield c


@pytest.fixture()
def oa(live: LiveServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


# ---------------------------------------------------------------------------- helpers
def _assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _assert_healthy(live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/health", timeout=10)
    assert r.status_code == 200, r.text


def _metric(live: LiveServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = m.group(2) or ""
        if all(f'{k}="{v}"' in got for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@contextlib.contextmanager
def model_thread_blocked(live: LiveServer) -> Iterator[None]:
    """Hold the model thread so that requests stay in flight until the block exits."""
    gate, entered = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(60)

    ctx = live.ctx
    assert ctx.loop is not None
    fut = asyncio.run_coroutine_threadsafe(ctx.async_engine.run_on_model_thread(block), ctx.loop)
    assert entered.wait(10)
    try:
        yield
    finally:
        gate.set()
        fut.result(10)


def _gen_stats(live: LiveServer) -> dict[str, Any]:
    """The server's generation counters, read on its model thread."""
    ae = live.ctx.async_engine
    return live.call(lambda: ae.run_on_model_thread(ae.generation_stats))


def _assert_no_pages_held(stats: dict[str, Any]) -> None:
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["free_kv_pages"] + stats["prefix_cache_pages"] == stats["num_kv_pages"] - 1


def _sse_events(r: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _chat_prompt(messages: list[dict[str, str]]) -> str:
    """What the checkpoint's chat template renders (checked against transformers below)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


# ---------------------------------------------------------------------------- completions
def test_completion_equals_offline_greedy(oa: Any, offline: Engine, live: LiveServer) -> None:
    ref = offline.generate(PROMPTS[0], max_new_tokens=8, temperature=0.0)[0]
    res = oa.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert res.object == "text_completion" and res.model == NAME
    assert res.id.startswith("cmpl-") and isinstance(res.created, int)
    (choice,) = res.choices
    assert choice.index == 0
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason == "length"
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert res.usage.completion_tokens == len(ref.token_ids) == 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + 8

    # token for token (extension), token-id prompts, several prompts => several choices
    refs = offline.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    ids = refs[1].prompt_token_ids
    res = oa.completions.create(
        model=NAME,
        prompt=[ids, ids],
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert [c.index for c in res.choices] == [0, 1]
    for c in res.choices:
        assert c.token_ids == refs[1].token_ids and c.text == refs[1].text
        assert c.prompt_token_ids == ids
    r = httpx.post(
        f"{live.url}/v1/completions",
        headers=live.headers,
        json={
            "prompt": [r.prompt_token_ids for r in refs],  # several token-id prompts
            "max_tokens": 12,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c, ref in zip(body["choices"], refs, strict=True):
        assert c["token_ids"] == ref.token_ids
        assert c["text"] == ref.text
        assert c["finish_reason"] == ref.finish_reason
        assert c["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == sum(len(x.prompt_token_ids) for x in refs)
    assert body["usage"]["completion_tokens"] == sum(len(x.token_ids) for x in refs)
    _assert_healthy(live)


def test_streaming_concatenates_to_the_same_text(
    oa: Any, offline: Engine, live: LiveServer
) -> None:
    refs = offline.generate(PROMPTS[:2], max_new_tokens=10, temperature=0.0)
    stream = oa.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 2  # one event per step that produced text
    assert "".join(c.choices[0].text for c in chunks) == refs[0].text
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    # two prompts, with usage at the end
    stream = oa.completions.create(
        model=NAME,
        prompt=PROMPTS[:2],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finish: dict[int, str] = {}
    usage = None
    for c in stream:
        if not c.choices:
            usage = c.usage
            continue
        (ch,) = c.choices
        texts[ch.index] += ch.text
        if ch.finish_reason is not None:
            finish[ch.index] = ch.finish_reason
    assert texts == [r.text for r in refs]
    assert finish == {0: "length", 1: "length"}
    assert usage is not None
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)

    # the raw wire format: data: {...}\n\n chunks, then data: [DONE]
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(r)
    assert events[-1] == "[DONE]"
    assert all(isinstance(e, dict) and "usage" not in e for e in events[:-1])
    _assert_healthy(live)


def test_seeded_sampling_is_reproducible(oa: Any, offline: Engine) -> None:
    kw: dict[str, Any] = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    a = oa.completions.create(model=NAME, prompt=PROMPTS[1], seed=1234, **kw)
    b = oa.completions.create(model=NAME, prompt=PROMPTS[1], seed=1234, **kw)
    c = oa.completions.create(model=NAME, prompt=PROMPTS[1], seed=99, **kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text
    ref = offline.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    assert a.choices[0].text == ref[0].text
    # top_k (extension) and streaming give the same seeded text
    ref = offline.generate(PROMPTS[1], max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    stream = oa.completions.create(
        model=NAME,
        prompt=PROMPTS[1],
        max_tokens=12,
        temperature=0.8,
        seed=7,
        stream=True,
        extra_body={"top_k": 20},
    )
    assert "".join(ch.choices[0].text for ch in stream) == ref[0].text


def test_stop_strings(oa: Any, offline: Engine, live: LiveServer) -> None:
    full = offline.generate(PROMPTS[2], max_new_tokens=24, temperature=0.0)[0].text
    assert full is not None and len(full) > 12
    stop = full[8:11]  # a piece from the middle of the greedy text
    ref = offline.generate(PROMPTS[2], max_new_tokens=24, temperature=0.0, stop=[stop, "@@"])[0]
    assert ref.finish_reason == "stop" and stop not in ref.text
    res = oa.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "@@"]
    )
    assert res.choices[0].text == ref.text
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens == len(ref.token_ids)
    # streaming never shows the stop string, and ends the same way
    chunks = list(
        oa.completions.create(
            model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == ref.text
    assert all(stop not in c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    _assert_healthy(live)


# ---------------------------------------------------------------------------- chat
def test_chat_completions_with_the_template(oa: Any, offline: Engine, live: LiveServer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
    ]
    prompt = _chat_prompt(messages)
    ref = offline.generate(prompt, max_new_tokens=6, temperature=0.0)[0]
    res = oa.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    (choice,) = res.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert res.usage.completion_tokens == len(ref.token_ids)

    # max_completion_tokens, streaming, text parts
    parts = [
        messages[0],
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
        },
    ]
    ref = offline.generate(
        _chat_prompt([messages[0], {"role": "user", "content": "hello\nworld"}]),
        max_new_tokens=5,
        temperature=0.0,
    )[0]
    stream = oa.chat.completions.create(
        model=NAME,
        messages=parts,  # type: ignore[arg-type]
        max_completion_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == ref.finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)

    # without max_tokens, chat generates up to the server's limit / the context
    res = oa.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "go"}],
        temperature=0,
        extra_body={"stop_token_ids": [int(ref.token_ids[0])]},
    )
    assert res.choices[0].finish_reason == "stop"
    _assert_healthy(live)


def test_chat_template_renders_like_transformers(tiny_qwen3: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from slipstream.server.chat import ChatTemplate

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_qwen3))
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": 'a {"json": 1} question'},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "again"},
    ]
    # A Qwen-like template: namespace, loop controls, tojson, trim/lstrip of blocks, tokens.
    fancy = (
        "{%- set ns = namespace(last_user=-1) %}\n"
        "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{% endif %}{% endfor %}\n"
        "{%- for m in messages %}\n"
        "    {%- if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}\n"
        "    {%- if m.role == 'assistant' and loop.index0 < ns.last_user %}\n"
        "{{ '<|im_start|>assistant\\n' + m.content | trim + '<|im_end|>' }}\n"
        "        {%- continue %}\n"
        "    {%- endif %}\n"
        "{{ '<|im_start|>' + m.role }}\n{{ m.content | tojson }}<|im_end|>\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
    )
    for template in (None, fancy):
        ours = ChatTemplate.load(tiny_qwen3, template)
        assert ours is not None
        theirs = tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert ours.render(messages) == theirs
    assert ChatTemplate.load(tiny_qwen3).render(messages[:2]) == _chat_prompt(messages[:2])


# ---------------------------------------------------------------------------- errors
BAD_COMPLETIONS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (id, json body, status, param, code)
    ("empty-string", {"prompt": ""}, 400, "prompt", None),
    ("empty-list", {"prompt": []}, 400, "prompt", None),
    ("empty-token-list", {"prompt": [[]]}, 400, "prompt", None),
    ("empty-string-in-list", {"prompt": ["ok", ""]}, 400, "prompt", None),
    ("token-id-too-big", {"prompt": [5, VOCAB]}, 400, "prompt", None),
    ("token-id-negative", {"prompt": [[-1, 5]]}, 400, "prompt", None),
    ("prompt-fills-context", {"prompt": [7] * CONTEXT}, 400, "prompt", None),
    ("prompt-missing", {"max_tokens": 3}, 400, "prompt", None),
    ("prompt-int", {"prompt": 5}, 400, "prompt", None),
    ("max-tokens-zero", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-negative", {"prompt": "a", "max_tokens": -3}, 400, "max_tokens", None),
    ("max-tokens-string", {"prompt": "a", "max_tokens": "8"}, 400, "max_tokens", None),
    ("max-tokens-over-limit", {"prompt": "a", "max_tokens": MAX_COMPLETION + 1}, 400,
     "max_tokens", None),
    ("prompt-plus-max-tokens-over-context", {"prompt": [7] * 300, "max_tokens": 1800}, 400,
     "max_tokens", None),
    ("temperature-negative", {"prompt": "a", "temperature": -0.5}, 400, "temperature", None),
    ("temperature-string", {"prompt": "a", "temperature": "hot"}, 400, "temperature", None),
    ("top-p-zero", {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("top-p-over-one", {"prompt": "a", "top_p": 1.5}, 400, "top_p", None),
    ("top-k-negative", {"prompt": "a", "top_k": -1}, 400, "top_k", None),
    ("n-two", {"prompt": "a", "n": 2}, 400, "n", None),
    ("seed-negative", {"prompt": "a", "seed": -1}, 400, "seed", None),
    ("seed-huge", {"prompt": "a", "seed": 2**64}, 400, "seed", None),
    ("stop-empty", {"prompt": "a", "stop": ""}, 400, "stop", None),
    ("stop-empty-in-list", {"prompt": "a", "stop": ["x", ""]}, 400, "stop", None),
    ("stop-int", {"prompt": "a", "stop": 5}, 400, "stop", None),
    ("stop-token-id-out-of-range", {"prompt": "a", "stop_token_ids": [VOCAB]}, 400,
     "stop_token_ids", None),
    ("stream-string", {"prompt": "a", "stream": "yes"}, 400, "stream", None),
    ("logprobs", {"prompt": "a", "logprobs": 2}, 400, "logprobs", None),
    ("echo", {"prompt": "a", "echo": True}, 400, "echo", None),
    ("best-of", {"prompt": "a", "best_of": 3}, 400, "best_of", None),
    ("presence-penalty", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ("unknown-model", {"prompt": "a", "model": "gpt-nope"}, 404, "model", "model_not_found"),
    ("too-many-prompts", {"prompt": ["a"] * (MAX_CLIENT_BATCH + 1)}, 413, "prompt",
     "too_many_inputs"),
    ("body-not-object", ["a"], 400, None, None),
]  # fmt: skip

BAD_CHATS: list[tuple[str, Any, int, str | None, str | None]] = [
    ("messages-empty", {"messages": []}, 400, "messages", None),
    ("messages-missing", {"max_tokens": 2}, 400, "messages", None),
    ("role-unknown", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", None),
    ("content-int", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ("content-image", {"messages": [{"role": "user", "content": [{"type": "image_url",
     "image_url": {"url": "x"}}]}]}, 400, "messages", None),
    ("max-tokens-zero", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens", None),
    ("max-completion-tokens-zero", {"messages": [{"role": "user", "content": "x"}],
     "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("max-tokens-disagree", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
     "max_completion_tokens": 4}, 400, "max_completion_tokens", None),
    ("n-three", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n", None),
    ("tools", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", None),
    ("temperature-negative", {"messages": [{"role": "user", "content": "x"}],
     "temperature": -1}, 400, "temperature", None),
    ("too-long", {"messages": [{"role": "user", "content": "word " * 2100}]}, 400, "messages",
     None),
    ("unknown-model", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404,
     "model", "model_not_found"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path,body,status,param,code",
    [("/v1/completions", *b[1:]) for b in BAD_COMPLETIONS]
    + [("/v1/chat/completions", *b[1:]) for b in BAD_CHATS],
    ids=[f"completions-{b[0]}" for b in BAD_COMPLETIONS] + [f"chat-{b[0]}" for b in BAD_CHATS],
)
def test_error_cases(
    live: LiveServer,
    client: httpx.Client,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    failures = _metric(live, "slipstream_request_failures_total")
    for stream in (False, True):
        if isinstance(body, dict) and stream:
            body = {**body, "stream": body.get("stream", True)}
        _assert_error(client.post(path, json=body), status, param, code)
    assert _metric(live, "slipstream_request_failures_total") == failures + 2
    assert live.ctx.async_engine.in_flight == 0
    _assert_healthy(live)


def test_no_chat_template_is_a_400(
    live: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live.ctx, "chat_template", None)
    err = _assert_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
        400,
        "messages",
        "chat_template_missing",
    )
    assert "chat template" in err["message"]
    # the template's own errors are 400s too
    from slipstream.server.chat import ChatTemplate

    strict = ChatTemplate.load(
        live.engine.model_dir, "{{ raise_exception('only user messages, please') }}"
    )
    monkeypatch.setattr(live.ctx, "chat_template", strict)
    err = _assert_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
        400,
        "messages",
    )
    assert "only user messages, please" in err["message"]


def test_auth_payload_and_draining(live: LiveServer, client: httpx.Client) -> None:
    body = {"prompt": "a", "max_tokens": 2}
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(f"{live.url}{path}", json=body)
        _assert_error(r, 401, code="invalid_api_key")
        r = httpx.post(f"{live.url}{path}", json=body, headers={"Authorization": "Bearer nope"})
        _assert_error(r, 401, code="invalid_api_key")
    big = {"prompt": "a" * PAYLOAD_LIMIT}
    _assert_error(client.post("/v1/completions", json=big), 413, code="payload_too_large")
    ctx = live.ctx
    ctx.draining = True  # what SIGTERM sets
    try:
        _assert_error(client.post("/v1/completions", json=body), 503, code="draining")
        chat = {"messages": [{"role": "user", "content": "x"}]}
        _assert_error(client.post("/v1/chat/completions", json=chat), 503, code="draining")
    finally:
        ctx.draining = False
    r = client.get("/v1/completions")
    _assert_error(r, 405, code="method_not_allowed")
    _assert_healthy(live)


def test_429_counts_generation_requests(live: LiveServer) -> None:
    ae = live.ctx.async_engine
    statuses: list[int] = []

    def worker(stream: bool) -> None:
        body = {"prompt": ["x y"] * MAX_CLIENT_BATCH, "max_tokens": 3, "stream": stream}
        with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
            r = c.post("/v1/completions", json=body)
            statuses.append(r.status_code)

    n = MAX_IN_FLIGHT // MAX_CLIENT_BATCH
    with model_thread_blocked(live):
        threads = [threading.Thread(target=worker, args=(i % 2 == 1,)) for i in range(n)]
        for t in threads:
            t.start()
        _wait_for(lambda: ae.in_flight == MAX_IN_FLIGHT)
        for path, body in [
            ("/v1/completions", {"prompt": "one more"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one more"}]}),
            ("/v1/embeddings", {"input": "one more"}),
        ]:
            r = httpx.post(f"{live.url}{path}", json=body, headers=live.headers)
            _assert_error(r, 429, code="too_many_inputs_in_flight")
            assert r.headers["retry-after"] == "1"
    for t in threads:
        t.join(60)
    assert statuses == [200] * n
    _wait_for(lambda: ae.in_flight == 0 and ae.generations == 0)
    _assert_healthy(live)


# ---------------------------------------------------------------------------- disconnects
def test_client_disconnect_mid_stream_aborts_the_request(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each decode step takes >= 5 ms here, so the 1900 tokens cannot all be generated before
    # the client has read its first events, however loaded the machine is (the tiny model
    # alone can outrun a client starved of CPU).
    from slipstream.engine.generation import GenerationEngine

    real_step = GenerationEngine.step

    def slow_step(self: GenerationEngine, *a: Any, **k: Any) -> Any:
        time.sleep(0.005)
        return real_step(self, *a, **k)

    monkeypatch.setattr(GenerationEngine, "step", slow_step)
    ae = live.ctx.async_engine
    aborted = ae.stats.gen_aborted
    aborts = _metric(live, "slipstream_generation_requests_total", finish_reason="abort")
    left = _metric(live, "slipstream_request_failures_total", reason="client_disconnected")
    body = {
        "prompt": PROMPTS[0],
        "max_tokens": MAX_COMPLETION,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            got = []
            for line in r.iter_lines():
                got.append(line)
                seen += line.startswith("data: ")
                if seen == 3:
                    break
            assert ae.generations == 1, (got, repr(ae.stats))  # still generating
    # the connection is closed: the request is aborted, not run to its 1900 tokens
    _wait_for(lambda: ae.stats.gen_aborted == aborted + 1)
    _wait_for(lambda: ae.generations == 0)
    _assert_no_pages_held(_gen_stats(live))
    assert (
        _metric(live, "slipstream_generation_requests_total", finish_reason="abort") == aborts + 1
    )
    _wait_for(
        lambda: (
            _metric(live, "slipstream_request_failures_total", reason="client_disconnected")
            == left + 1
        )
    )

    # non-streaming: leaving while it generates aborts it too
    aborted = ae.stats.gen_aborted
    raw_body = json.dumps({**body, "stream": False}).encode()
    raw = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw_body)}\r\n\r\n"
    ).encode() + raw_body
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(raw)
    _wait_for(lambda: ae.generations == 1)
    sock.close()
    _wait_for(lambda: ae.stats.gen_aborted == aborted + 1)
    _wait_for(lambda: ae.generations == 0)
    _assert_no_pages_held(_gen_stats(live))
    _assert_healthy(live)


# ---------------------------------------------------------------------------- interleaving
def test_embeddings_interleave_with_generations(live: LiveServer, offline: Engine, oa: Any) -> None:
    texts = ["alpha beta", "the quick brown fox jumps over the lazy dog", "one two three"]
    ref_vecs = offline.embed(texts)
    ae = live.ctx.async_engine

    # A long generation streams while embeddings are answered: they are not queued behind it.
    body = {"prompt": PROMPTS[1], "max_tokens": MAX_COMPLETION, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            forwards = ae.stats.forwards
            for text, ref in zip(texts, ref_vecs, strict=True):
                res = oa.embeddings.create(model=NAME, input=text, encoding_format="float")
                got = np.asarray(res.data[0].embedding, np.float32)
                assert np.abs(got - ref).max() <= 1e-5
            assert ae.stats.forwards >= forwards + len(texts)
            assert ae.generations == 1  # the generation is still running
    _wait_for(lambda: ae.generations == 0)

    # Both kinds at once from many clients: every answer equals the offline engine's.
    gen_refs = offline.generate(PROMPTS, max_new_tokens=16, temperature=0.0)
    results: dict[tuple[str, int], Any] = {}
    errors: list[BaseException] = []

    def gen_worker(i: int) -> None:
        try:
            stream = i % 2 == 1
            res = oa.completions.create(
                model=NAME, prompt=PROMPTS[i % 3], max_tokens=16, temperature=0, stream=stream
            )
            text = "".join(ch.choices[0].text for ch in res) if stream else res.choices[0].text
            results[("gen", i)] = text
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    def emb_worker(i: int) -> None:
        try:
            res = oa.embeddings.create(model=NAME, input=texts, encoding_format="float")
            results[("emb", i)] = np.asarray([d.embedding for d in res.data], np.float32)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=gen_worker, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=emb_worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(6):
        assert results[("gen", i)] == gen_refs[i % 3].text, i
    for i in range(3):
        assert np.abs(results[("emb", i)] - ref_vecs).max() <= 1e-5
    _wait_for(lambda: ae.generations == 0 and ae.in_flight == 0)
    _assert_no_pages_held(_gen_stats(live))


# ---------------------------------------------------------------------------- failures
def test_failed_generation_step_fails_only_its_requests(
    live: LiveServer, client: httpx.Client, offline: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ae = live.ctx.async_engine
    r = client.post("/v1/completions", json={"prompt": "warm", "max_tokens": 1})
    assert r.status_code == 200
    gen = ae._gen
    assert gen is not None
    original = gen.runner.forward
    poison_pos = 9  # fail the step that computes this position (after some tokens streamed)

    def flaky(batch: Any) -> Any:
        if poison_pos in batch.positions:
            raise RuntimeError("injected generation failure")
        return original(batch)

    monkeypatch.setattr(gen.runner, "forward", flaky)
    before = _metric(live, "slipstream_request_failures_total", reason="forward_failed")
    # before the first token: a plain HTTP 500
    err = _assert_error(
        client.post("/v1/completions", json={"prompt": [5] * 12, "max_tokens": 4}),
        500,
        code="forward_failed",
    )
    assert err["type"] == "server_error"
    # after the stream started: an error event ends the stream
    body = {"prompt": [5, 6, 7], "max_tokens": 20, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = _sse_events(r)
    assert len(events) >= 2 and "[DONE]" not in events
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "forward_failed"
    assert all("choices" in e for e in events[:-1])
    assert _metric(live, "slipstream_request_failures_total", reason="forward_failed") == before + 2
    monkeypatch.setattr(gen.runner, "forward", original)
    _assert_no_pages_held(_gen_stats(live))
    # the next request works
    ref = offline.generate(PROMPTS[0], max_new_tokens=5, temperature=0.0)[0]
    r = client.post(
        "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
    _assert_healthy(live)


def test_generation_metrics(live: LiveServer, client: httpx.Client) -> None:
    tokens = _metric(live, "slipstream_generation_tokens_total")
    prompt = _metric(live, "slipstream_generation_prompt_tokens_total")
    ttft = _metric(live, "slipstream_time_to_first_token_seconds_count")
    itl = _metric(live, "slipstream_inter_token_latency_seconds_count")
    length = _metric(live, "slipstream_generation_requests_total", finish_reason="length")
    r = client.post(
        "/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 6, "ignore_eos": True}
    )
    assert r.status_code == 200
    assert _metric(live, "slipstream_generation_tokens_total") == tokens + 6
    assert _metric(live, "slipstream_generation_prompt_tokens_total") == prompt + 3
    assert _metric(live, "slipstream_time_to_first_token_seconds_count") == ttft + 1
    assert _metric(live, "slipstream_inter_token_latency_seconds_count") == itl + 5
    assert _metric(live, "slipstream_generation_requests_total", finish_reason="length") == (
        length + 1
    )
    assert _metric(live, "slipstream_generation_step_seconds_count") > 0
    assert _metric(live, "slipstream_generation_requests_running") == 0
    assert _metric(live, "slipstream_requests_total", endpoint="/v1/completions", status="200") > 0


# ---------------------------------------------------------------------------- no live server
def test_embedding_only_use_allocates_no_kv_pool(tiny_qwen3: Path) -> None:
    from starlette.testclient import TestClient

    from slipstream.server.app import create_app

    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", num_kv_pages=64)
    with TestClient(create_app(engine, ServerSettings(served_model_name=NAME))) as c:
        for _ in range(3):
            assert c.post("/v1/embeddings", json={"input": ["a b", "c"]}).status_code == 200
        assert engine._generation is None and engine.generation_stats() == {}
        r = c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert engine._generation is not None  # created on the first generation request


def test_bert_model_does_not_support_generation(minilm_engine: Engine) -> None:
    from starlette.testclient import TestClient

    from slipstream.server.app import create_app

    with TestClient(create_app(minilm_engine, ServerSettings())) as c:
        for path, body in [
            ("/v1/completions", {"prompt": "hello", "max_tokens": 2}),
            ("/v1/completions", {"prompt": "", "n": 5, "stream": True}),  # checked first
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ]:
            err = _assert_error(c.post(path, json=body), 400, "model", "model_not_supported")
            assert err["message"].startswith("model does not support generation")
            assert "bert" in err["message"]
        assert c.post("/v1/embeddings", json={"input": "still embeds"}).status_code == 200
    assert minilm_engine._generation is None


def test_stop_drains_generations_within_the_timeout(tiny_qwen3: Path) -> None:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", num_kv_pages=256)

    async def drained() -> None:
        ae = AsyncEngine(engine)
        await ae.start()
        params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
        stream = ae.generate([[5, 6, 7]], params)
        await stream.first()
        collect = asyncio.ensure_future(_drain(stream))
        await ae.stop(timeout=60)  # waits for the generation in flight
        assert ae.generations == 0
        deltas = await collect
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas) == 200
        with pytest.raises(EngineStopped):
            ae.generate([[5]], params)

    async def timed_out() -> AsyncEngine:
        ae = AsyncEngine(engine)
        await ae.start()
        params = SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True)
        stream = ae.generate([[5, 6, 8]], params)
        await stream.first()
        collect = asyncio.ensure_future(_drain(stream))
        await ae.stop(timeout=0.1)  # far too short for 1900 tokens
        with pytest.raises(EngineStopped):
            await collect
        return ae

    asyncio.run(drained())
    ae = asyncio.run(timed_out())
    assert ae._worker is not None
    ae._worker.thread.join(30)  # on exit, the worker aborts what is left
    assert ae.stats.gen_aborted == 1
    _assert_no_pages_held(engine.generation_stats())


async def _drain(stream: Any) -> list[Any]:
    return [d async for d in stream]


def test_sigterm_drains_a_streaming_generation(tiny_qwen3: Path) -> None:
    """The real command: SIGTERM while a generation streams; it runs to its end, exit 0."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "slipstream", "serve", "--model", str(tiny_qwen3),
           "--port", "0", "--shutdown-timeout", "60", "--kv-cache-gb", "0.01"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    log: list[str] = []
    ready = threading.Event()
    found: dict[str, str] = {}

    def read_log() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"ready on (http://[\d.]+:\d+):", line)
            if m:
                found["url"] = m.group(1)
                ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "".join(log)
        body = {"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True,
                "temperature": 0}  # fmt: skip
        events: list[Any] = []
        with httpx.Client(base_url=found["url"], timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:]) for e in events[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    text = "".join(log)
    assert re.search(r"draining: no new requests; finishing 1 in-flight inputs", text), text
    assert "slipstream server stopped" in text and "Traceback" not in text
