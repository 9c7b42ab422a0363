"""Qwen3 against transformers on the same random weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slipstream import Engine
from slipstream.attention import AttentionMetadata
from tests.hf_utils import hf_hidden_states, save_hf_qwen3

COS_MIN = 0.99999

CASES = {
    "gqa-tied-model": dict(layout="model", num_heads=4, num_kv_heads=2, tied=True),
    "mha-untied-causal": dict(layout="causal-lm", num_heads=4, num_kv_heads=4, tied=False),
    "gqa4-tied-causal": dict(layout="causal-lm", num_heads=8, num_kv_heads=2, tied=True, seed=1),
    "gqa-sharded-bf16": dict(
        layout="causal-lm",
        num_heads=4,
        num_kv_heads=2,
        tied=True,
        dtype=torch.bfloat16,
        max_shard_size="100KB",
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_qwen3(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path
) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    return save_hf_qwen3(out, tokenizer_from=tiny_qwen3, **CASES[request.param])


SEQS = [
    [5, 17, 300, 2, 999, 41, 7],
    [1],
    [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 3],
    [600, 601],
]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_hidden_states_and_embeddings_match_transformers(hf_qwen3: Path) -> None:
    if (hf_qwen3 / "model.safetensors.index.json").exists():
        assert len(list(hf_qwen3.glob("*.safetensors"))) > 1
    engine = Engine(hf_qwen3, device="cpu", dtype="float32", debug_checks=True)
    refs = hf_hidden_states(hf_qwen3, SEQS)
    # per-token hidden states, whole batch packed in one forward
    lens = [len(s) for s in SEQS]
    meta = AttentionMetadata.from_seq_lens(lens, causal=True, device="cpu")
    ids = torch.tensor([t for s in SEQS for t in s])
    pos = torch.tensor([p for s in SEQS for p in range(len(s))])
    with torch.inference_mode():
        hidden = engine.runner.model(ids, pos, meta)
    ref = torch.cat(refs)
    assert hidden.shape == ref.shape
    assert _cos(hidden, ref).min().item() >= COS_MIN
    assert (hidden - ref).abs().max().item() < 1e-4
    # pooled (last token) and normalised embeddings
    vecs = torch.from_numpy(engine.embed(SEQS, show_progress=False))
    ref_vecs = torch.nn.functional.normalize(torch.stack([r[-1] for r in refs]), dim=-1)
    assert _cos(vecs, ref_vecs).min().item() >= COS_MIN


def test_make_checkpoint_loads_in_transformers_and_matches(tiny_qwen3: Path) -> None:
    seqs = [[3, 4, 5, 6, 7, 8, 9], [100, 200]]
    refs = hf_hidden_states(tiny_qwen3, seqs)
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32")
    vecs = torch.from_numpy(engine.embed(seqs, normalize=False, show_progress=False))
    assert _cos(vecs, torch.stack([r[-1] for r in refs])).min().item() >= COS_MIN


def test_qwen3_text_input_keeps_endoftext_when_truncated(tiny_qwen3: Path) -> None:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", max_input_tokens=8)
    eos = engine.model_config.eos_token_ids[0]
    long_text = "the quick brown fox jumps over the lazy dog " * 5
    (ids,) = engine.tokenize([long_text])
    assert len(ids) == 8
    assert ids[-1] == eos
    (short,) = engine.tokenize(["the cat"])
    assert short[-1] == eos and len(short) < 8


def test_module_apply_walks_every_submodule(tiny_qwen3: Path) -> None:
    """nn.Module.apply recurses into children by name; no layer may shadow it."""
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32")
    seen: list[str] = []
    engine.runner.model.apply(lambda m: seen.append(type(m).__name__))
    assert "RotaryEmbedding" in seen and "Qwen3DecoderLayer" in seen
