"""BERT: all-MiniLM-L6-v2 against sentence-transformers; a random BERT against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream import Engine

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "slipstream packs sequences end to end, without padding, and never copies attention "
    "outputs it does not have to copy. " * 16,
    "x",
]


def test_minilm_matches_sentence_transformers(minilm_dir: Path, minilm_engine: Engine) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    ref = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    ours = minilm_engine.embed(SENTENCES, show_progress=False)
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    cos = (ours.astype(np.float64) * ref).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1)
    )
    assert cos.min() >= 0.99999, cos
    # the long sentence was truncated to max_seq_length=256 exactly as sentence-transformers does
    assert minilm_engine.max_input_tokens == 256
    assert len(minilm_engine.tokenize([SENTENCES[9]])[0]) == 256


def test_minilm_matryoshka_matches_truncate_then_normalize(minilm_engine: Engine) -> None:
    full = minilm_engine.embed(SENTENCES[:3], normalize=False, show_progress=False)
    cut = minilm_engine.embed(SENTENCES[:3], dimensions=64, show_progress=False)
    expect = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(cut, expect, atol=1e-6)


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    import shutil

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    out = tmp_path_factory.mktemp("bert")
    BertModel(cfg).save_pretrained(out)
    shutil.copy(minilm_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def test_random_bert_matches_transformers_per_token(random_bert: Path) -> None:
    from transformers import AutoModel

    from slipstream.attention import AttentionMetadata

    hf = AutoModel.from_pretrained(random_bert, dtype=torch.float32).eval()
    engine = Engine(random_bert, device="cpu", dtype="float32", debug_checks=True)
    seqs = engine.tokenize(["hello there", "a somewhat longer sentence for the encoder", "z"])
    with torch.no_grad():
        refs = [hf(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]
    meta = AttentionMetadata.from_seq_lens([len(s) for s in seqs], causal=False, device="cpu")
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([p for s in seqs for p in range(len(s))])
    with torch.inference_mode():
        hidden = engine.runner.model(ids, pos, meta)
    assert (hidden - torch.cat(refs)).abs().max().item() < 1e-4
    # mean pooling (no sentence-transformers files: BERT defaults to mean)
    vecs = engine.embed(seqs, normalize=False, show_progress=False)
    expect = torch.stack([r.mean(0) for r in refs]).numpy()
    np.testing.assert_allclose(vecs, expect, atol=1e-5)
