"""Benchmark workloads (seeded, capped) and the FLOP count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slipstream.bench.flops import attention_flops, embed_flops, linear_flops
from slipstream.bench.workloads import make_workload, random_token_ids
from slipstream.config import ModelConfig
from slipstream.errors import ConfigError


def test_named_workloads_are_seeded_and_in_range() -> None:
    a = make_workload("mixed", 400, vocab_size=1000, seed=3)
    b = make_workload("mixed", 400, vocab_size=1000, seed=3)
    c = make_workload("mixed", 400, vocab_size=1000, seed=4)
    assert a.lengths == b.lengths and a.token_ids == b.token_ids
    assert a.lengths != c.lengths
    assert all(0 <= t < 1000 for s in a.token_ids for t in s)
    assert [len(s) for s in a.token_ids] == list(a.lengths)
    assert a.capped_items == 0 and a.total_tokens == sum(a.lengths)

    short = make_workload("short", 300, vocab_size=50, seed=0)
    assert all(8 <= n <= 64 for n in short.lengths)
    long = make_workload("long", 3, vocab_size=50)
    assert long.lengths == (7168, 7168, 7168)


def test_mixed_bucket_proportions() -> None:
    lens = make_workload("mixed", 4000, vocab_size=10, seed=1).lengths
    small = sum(8 <= n <= 128 for n in lens) / len(lens)
    mid = sum(256 <= n <= 1024 for n in lens) / len(lens)
    big = sum(2048 <= n <= 8192 for n in lens) / len(lens)
    assert small + mid + big == pytest.approx(1.0)
    assert small == pytest.approx(0.50, abs=0.03)
    assert mid == pytest.approx(0.35, abs=0.03)
    assert big == pytest.approx(0.15, abs=0.03)
    # log-uniform: the geometric middle of [8, 128] splits the small bucket in half
    under = sum(8 <= n < 32 for n in lens) / len(lens)
    assert under == pytest.approx(0.25, abs=0.03)


def test_lengths_are_capped_and_counted() -> None:
    wl = make_workload("long", 4, vocab_size=100, max_len=2048)
    assert wl.lengths == (2048,) * 4 and wl.capped_items == 4
    assert wl.summary()["capped_items"] == 4 and wl.summary()["length_cap"] == 2048


def test_file_workload(tmp_path: Path) -> None:
    f = tmp_path / "lens.json"
    f.write_text(json.dumps([5, 10, 3000]))
    wl = make_workload(str(f), None, vocab_size=100, max_len=1000)
    assert wl.lengths == (5, 10, 1000) and wl.capped_items == 1 and wl.name == "lens.json"
    assert make_workload(str(f), 5, vocab_size=100).lengths == (5, 10, 3000, 5, 10)
    g = tmp_path / "d.json"
    g.write_text(json.dumps({"lengths": [7, 8]}))
    assert make_workload(str(g), None, vocab_size=100).lengths == (7, 8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([3, -1]))
    with pytest.raises(ConfigError, match="entry 1"):
        make_workload(str(bad), None, vocab_size=100)
    with pytest.raises(ConfigError, match="neither"):
        make_workload("nope", 3, vocab_size=100)


def test_excluded_ids_never_drawn() -> None:
    seqs = random_token_ids([500] * 4, vocab_size=8, seed=0, exclude=(0, 7))
    seen = {t for s in seqs for t in s}
    assert seen == {1, 2, 3, 4, 5, 6}


def test_texts_have_one_word_per_token() -> None:
    wl = make_workload("short", 5, vocab_size=100)
    assert [len(t.split()) for t in wl.texts()] == list(wl.lengths)


def test_flops(tiny_qwen3: Path) -> None:
    cfg = ModelConfig.from_hf(tiny_qwen3)
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
    assert linear_flops(cfg, 10) == 2 * per_layer * cfg.num_layers * 10
    hd = cfg.num_layers * cfg.num_heads * cfg.head_dim
    assert attention_flops(cfg, 7) == 4 * hd * 7 * 8 // 2  # causal: L (L + 1) / 2 pairs
    assert embed_flops(cfg, [7, 3]) == (
        linear_flops(cfg, 10) + attention_flops(cfg, 7) + attention_flops(cfg, 3)
    )


def test_flops_bidirectional(minilm_dir: Path) -> None:
    cfg = ModelConfig.from_hf(minilm_dir)
    assert not cfg.causal
    assert attention_flops(cfg, 9) == 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 81
    assert math.isclose(embed_flops(cfg, [9]), linear_flops(cfg, 9) + attention_flops(cfg, 9))
