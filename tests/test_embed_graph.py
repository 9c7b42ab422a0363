"""CUDA graphs for embedding forwards (engine/embed_graph.py).

CPU: the bucket keys, the padded input layout, and the device-only pooling the graphs capture.
GPU: graph replays give the eager engine's vectors (last-token Qwen3; CLS and mean BERT), every
key is captured once and replayed after, padding never leaks into a real sequence, and the
graph cache is bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream.engine.batch import Batch
from slipstream.engine.embed_graph import TOKEN_STEP, graph_key, padded_inputs
from slipstream.layers.pooler import pool


def test_graph_key_buckets() -> None:
    b = Batch.pack([[1] * 5, [2] * 300, [3]], [0, 1, 2])  # 306 tokens, 3 sequences
    t_b, b_b, s = graph_key(b, 16384, 1024)  # type: ignore[misc]
    assert t_b == 2 * TOKEN_STEP and t_b >= 306
    assert b_b == 4  # a power of two with room for the dummy padding sequence
    assert s == 512  # the attention bucket of max(300, padding 206)
    exact = Batch.pack([[1] * TOKEN_STEP], [0])
    assert graph_key(exact, 16384, 1024) == (TOKEN_STEP, 2, TOKEN_STEP)
    assert graph_key(b, 256, 1024) is None  # more tokens than the buffers hold
    assert graph_key(b, 16384, 2) is None  # more sequences than the buffers hold


def test_padded_inputs_layout() -> None:
    seqs = [[7, 8, 9], [4], [5, 6]]
    b = Batch.pack(seqs, [0, 1, 2])
    both, cu = padded_inputs(b, 16, 8)
    assert both.shape == (2, 16) and both.dtype == np.int64
    assert both[0, :6].tolist() == [7, 8, 9, 4, 5, 6]
    assert both[1, :6].tolist() == [0, 1, 2, 0, 0, 1]
    # padding: one dummy sequence of 10 tokens (id 0) at positions 0..9 after the real ones
    assert both[0, 6:].tolist() == [0] * 10
    assert both[1, 6:].tolist() == list(range(10))
    # cu_seqlens: the real offsets, then the dummy sequence, then empty sequences
    assert cu.dtype == np.int32 and cu.tolist() == [0, 3, 4, 6, 16, 16, 16, 16, 16]
    # a model with a short position table: padding positions wrap inside it
    both, _ = padded_inputs(b, 16, 8, max_positions=4)
    assert both[1, :6].tolist() == [0, 1, 2, 0, 0, 1]
    assert both[1, 6:].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("mode", ["last", "cls", "mean"])
def test_device_pooling_matches_per_sequence_reference(mode: str) -> None:
    # Lengths include empty sequences in the middle and at the end (graph padding), and a
    # padded tail that belongs to a dummy sequence.
    lens = [3, 0, 1, 5, 2, 0, 0]
    torch.manual_seed(0)
    hidden = torch.randn(sum(lens), 8, dtype=torch.bfloat16)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    got = pool(hidden, cu, mode)
    assert got.shape == (len(lens), 8) and got.dtype == torch.float32
    start = 0
    for i, n in enumerate(lens):
        rows = hidden[start : start + n].float()
        start += n
        if n == 0:
            if mode == "mean":
                assert torch.equal(got[i], torch.zeros(8))
            continue  # cls / last of an empty sequence: some in-range row, never read
        want = {"last": rows[-1], "cls": rows[0], "mean": rows.mean(0)}[mode]
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(hidden, cu, "max")


def test_no_graphs_on_cpu(tiny_qwen3: Path) -> None:
    from slipstream import Engine

    assert Engine(tiny_qwen3, device="cpu").runner.embed_graphs is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _seqs(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = [1, 2, 3, 17, 64, 100, 257] + rng.integers(1, 200, n).tolist()
    return [rng.integers(5, 1000, int(k)).tolist() for k in lens]


@pytest.mark.gpu
@cuda
def test_gpu_graph_replays_match_eager(tiny_qwen3: Path) -> None:
    from slipstream import Engine

    seqs = _seqs(40, 0)
    kw = {"device": "cuda", "dtype": "bfloat16", "max_batch_tokens": 512}
    eager = Engine(tiny_qwen3, disable_cuda_graph=True, **kw)
    assert eager.runner.embed_graphs is None
    want = eager.embed_token_ids(seqs)
    eng = Engine(tiny_qwen3, **kw)
    graphs = eng.runner.embed_graphs
    assert graphs is not None
    first = eng.embed_token_ids(seqs)  # per key: the first forward eager + capture, then replays
    n_keys, forwards = graphs.captures, graphs.captures + graphs.replays
    assert n_keys >= 2 and forwards > n_keys
    second = eng.embed_token_ids(seqs)  # replays only
    assert graphs.captures == n_keys and graphs.replays == 2 * forwards - n_keys
    for got in (first, second):
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.9995, cos.min()
    np.testing.assert_allclose(second, first, rtol=0, atol=2e-3)
    # Batch invariance through the padding: each sequence alone gives its packed vector.
    alone = np.stack([eng.embed_token_ids([s])[0] for s in seqs[:6]])
    np.testing.assert_allclose(alone, second[:6], rtol=0, atol=2e-2)


@pytest.mark.gpu
@cuda
def test_gpu_graph_cache_is_bounded(tiny_qwen3: Path) -> None:
    from slipstream import Engine
    from slipstream.engine.embed_graph import EmbedCudaGraphs

    eng = Engine(tiny_qwen3, device="cuda", dtype="bfloat16", max_batch_tokens=4096)
    runner = eng.runner
    runner.embed_graphs = EmbedCudaGraphs(
        runner.pooled_forward, runner.device, 4096, 512, causal=True, max_graphs=2
    )
    for n in (10, 300, 700, 1000):  # four token buckets
        eng.embed_token_ids([[5] * n])
    assert runner.embed_graphs.captures == 4
    assert len(runner.embed_graphs.graphs) == 2
    # an evicted key is captured again, the kept ones replay
    eng.embed_token_ids([[5] * 1000])
    assert runner.embed_graphs.replays == 1
    eng.embed_token_ids([[5] * 10])
    assert runner.embed_graphs.captures == 5


def _bert(out: Path, mode: str) -> Path:
    """A random BERT (MiniLM's layout, small) saved by transformers, with sentence-transformers
    files selecting ``mode`` pooling; no tokenizer (token-id inputs only)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=96, max_position_embeddings=300,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(out)
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"},
            ]
        )  # fmt: skip
    )
    (out / "1_Pooling").mkdir()
    flag = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}[mode]
    (out / "1_Pooling" / "config.json").write_text(json.dumps({flag: True}))
    return out


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_gpu_bert_graphs_match_eager(mode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from slipstream import Engine

    ckpt = _bert(tmp_path_factory.mktemp(f"bert_{mode}"), mode)
    # lengths up to 257 against a 300-row position table: padding positions wrap
    seqs = [s[:290] for s in _seqs(40, 1)]
    kw = {"device": "cuda", "dtype": "bfloat16", "max_batch_tokens": 512}
    eager = Engine(ckpt, disable_cuda_graph=True, **kw)
    assert eager.model_config.pooling.mode == mode and eager.runner.embed_graphs is None
    want = eager.embed_token_ids(seqs)
    eng = Engine(ckpt, **kw)
    graphs = eng.runner.embed_graphs
    assert graphs is not None
    first = eng.embed_token_ids(seqs)
    second = eng.embed_token_ids(seqs)  # replays only
    assert graphs.captures >= 2 and graphs.replays > graphs.captures
    for got in (first, second):
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.9995, cos.min()
    alone = np.stack([eng.embed_token_ids([s])[0] for s in seqs[:6]])
    np.testing.assert_allclose(alone, second[:6], rtol=0, atol=2e-2)


def test_disable_cuda_graph_reaches_the_config(tiny_qwen3: Path) -> None:
    from slipstream import Engine

    assert Engine(tiny_qwen3, device="cpu").config.cuda_graphs is True
    assert Engine(tiny_qwen3, device="cpu", disable_cuda_graph=True).config.cuda_graphs is False
