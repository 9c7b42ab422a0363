"""Sampling: the sampler on known distributions, seeded reproducibility through the engine,
stop strings / stop tokens / max_new_tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slipstream import Engine
from slipstream.sampling import SamplingBatch, SamplingParams, filtered_probs, row_uniform, sample
from tests.hf_utils import save_hf_qwen3

P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
N = 6000
TOL = 0.025  # ~3.5 standard deviations of a frequency estimate at N = 6000


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _freqs(params: SamplingParams, seed: int = 11) -> torch.Tensor:
    """Empirical distribution of N draws (rows = consecutive output steps of one request)."""
    logits = P.log().expand(N, -1)
    sp = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                        seed=seed)  # fmt: skip
    sb = SamplingBatch.build([sp] * N, list(range(N)), torch.device("cpu"))
    ids = sample(logits, sb)
    return torch.bincount(ids, minlength=len(P)).float() / N


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"temperature": 1.0}, P),
        ({"temperature": 0.5}, P**2 / (P**2).sum()),
        ({"temperature": 1.0, "top_k": 2}, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65),
        ({"temperature": 1.0, "top_p": 0.6}, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65),
        ({"temperature": 1.0, "top_p": 0.7}, torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8),
        ({"temperature": 2.0, "top_k": 3, "top_p": 0.9}, None),
    ],
    ids=["t1", "t0.5", "topk2", "topp0.6", "topp0.7", "combined"],
)
def test_sampler_matches_the_target_distribution(kw: dict, expected: torch.Tensor | None) -> None:
    params = SamplingParams(**kw)
    if expected is None:  # combined filters: compare with the filter function itself
        sb = SamplingBatch.build([params], [0], torch.device("cpu"))
        expected = filtered_probs(P.log()[None], sb)[0]
        assert expected[3:].sum() == 0 and abs(expected.sum().item() - 1) < 1e-6
    freqs = _freqs(params)
    assert (freqs - expected).abs().max().item() < TOL, (freqs, expected)
    assert freqs[expected == 0].sum() == 0  # filtered tokens are never drawn


def test_greedy_and_top_k_1_take_the_argmax() -> None:
    assert _freqs(SamplingParams(temperature=0.0))[0] == 1.0
    assert _freqs(SamplingParams(temperature=1.5, top_k=1))[0] == 1.0


def test_uniforms_are_a_function_of_seed_and_step_only() -> None:
    seeds = torch.tensor([1, 2, 1, 2**40 + 1])
    u = row_uniform(seeds, torch.zeros(4, dtype=torch.int64))
    assert u[0] == u[2] and u[0] != u[1] and u[0] != u[3]  # high seed bits matter too
    assert row_uniform(seeds[:1], torch.ones(1, dtype=torch.int64))[0] != u[0]
    many = row_uniform(torch.full((20000,), 5), torch.arange(20000))
    assert 0.0 < many.min().item() and many.max().item() < 1.0
    # Uniform: every decile holds ~10% of the draws.
    hist = torch.histc(many, bins=10, min=0.0, max=1.0) / many.numel()
    assert (hist - 0.1).abs().max().item() < 0.01


# ------------------------------------------------------------------------------ engine level
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Path:
    out = tmp_path_factory.mktemp("sampling_ckpt")
    return save_hf_qwen3(out, layout="causal-lm", tied=False, seed=2, tokenizer_from=tiny_qwen3)


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return Engine(ckpt, device="cpu", dtype="float32", page_size=4, debug_checks=True)


PROMPTS = [[5, 17, 300, 2, 999, 41, 7], [1, 2], list(range(40, 71))]


def test_seeded_sampling_is_reproducible_per_request(engine: Engine, ckpt: Path) -> None:
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = engine.generate(PROMPTS, seed=[7, 8, 9], **kw)  # type: ignore[arg-type]
    b = engine.generate(PROMPTS, seed=[7, 8, 9], **kw)  # type: ignore[arg-type]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # Alone, or batched differently: the same tokens for the same seed.
    alone = engine.generate([PROMPTS[1]], seed=8, **kw)[0]  # type: ignore[arg-type]
    assert alone.token_ids == a[1].token_ids
    # A different seed gives a different continuation (over 10 tokens of a 1024-token vocab).
    assert engine.generate([PROMPTS[1]], seed=99, **kw)[0].token_ids != a[1].token_ids  # type: ignore[arg-type]
    # Under pool pressure (preemption + recompute) the seeded tokens do not change either.
    tight = Engine(ckpt, device="cpu", dtype="float32", page_size=4, num_kv_pages=14)
    c = tight.generate(PROMPTS, seed=[7, 8, 9], **kw)  # type: ignore[arg-type]
    assert tight.generation_stats()["num_preemptions"] > 0
    assert [o.token_ids for o in c] == [o.token_ids for o in a]


def test_top_k_1_equals_greedy(engine: Engine) -> None:
    greedy = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    topk1 = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.3, top_k=1, seed=3)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_stop_string_cuts_text_and_finishes_with_stop(engine: Engine) -> None:
    (ref,) = engine.generate([PROMPTS[2]], max_new_tokens=16, temperature=0.0)
    assert ref.finish_reason == "length" and len(ref.token_ids) == 16
    text = ref.text
    assert text is not None and len(text) > 8
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    out = engine.generate([PROMPTS[2]], max_new_tokens=16, temperature=0.0, stop=[stop, "\x00"])[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    assert out.token_ids == ref.token_ids[: len(out.token_ids)] and len(out.token_ids) < 16

    # Streaming never leaks (part of) the stop string.
    gen = engine.generation_engine()
    rid = gen.add_request(PROMPTS[2], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                     stop=(stop,)), detokenize=True)  # fmt: skip
    streamed = ""
    while gen.has_unfinished():
        for o in gen.step():
            assert o.request_id == rid
            streamed += o.new_text or ""
    assert streamed == text[:cut]


def test_stop_token_ids_and_max_new_tokens(engine: Engine) -> None:
    (ref,) = engine.generate([PROMPTS[0]], max_new_tokens=12, temperature=0.0)
    stop_tok = ref.token_ids[3]
    first = ref.token_ids.index(stop_tok)
    out = engine.generate([PROMPTS[0]], max_new_tokens=12, temperature=0.0,
                          stop_token_ids=[stop_tok])[0]  # fmt: skip
    assert out.token_ids == ref.token_ids[: first + 1]  # the stop token is included in ids
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert engine.generation_engine().tokenizer is not None
    short = engine.generate([PROMPTS[0]], max_new_tokens=2, temperature=0.0)[0]
    assert short.finish_reason == "length" and short.token_ids == ref.token_ids[:2]


def test_out_of_range_sampling_values_fail_their_own_request() -> None:
    from slipstream.errors import InputError
    from slipstream.sampling import SamplingParams

    with pytest.raises(InputError, match="seed must be an integer in"):
        SamplingParams(seed=2**63)
    with pytest.raises(InputError, match="top_k must be in"):
        SamplingParams(top_k=2**40)
    with pytest.raises(InputError, match="top_k must be in"):
        SamplingParams(top_k=-7)
    assert SamplingParams(top_k=-1).top_k == -1
    # a vanishing temperature is the greedy limit, a vanishing top_p keeps the top token
    assert SamplingParams(temperature=1e-30).greedy
    assert SamplingParams(top_p=1e-12).top_p == 1e-6
