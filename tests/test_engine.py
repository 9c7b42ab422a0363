"""Offline API: packing, ordering, batch invariance, validation errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slipstream import Engine
from slipstream.engine.scheduler import plan_embed_batches, plan_embed_groups
from slipstream.errors import InputError


def _seqs(n: int, seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("engine_name", ["qwen3_engine", "minilm_engine"])
def test_alone_equals_packed(engine_name: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(engine_name)
    seqs = _seqs(9, seed=1)
    packed = engine.embed(seqs, show_progress=False)  # one forward, all packed together
    for i, s in enumerate(seqs):
        alone = engine.embed([s], show_progress=False)[0]
        assert np.abs(alone - packed[i]).max() <= 1e-5


def test_batches_respect_budget_and_results_keep_input_order(qwen3_engine: Engine) -> None:
    seqs = _seqs(25, seed=2)
    batches = plan_embed_batches(seqs, max_batch_tokens=64, max_batch_size=512)
    assert len(batches) > 1
    seen = sorted(i for b in batches for i in b.item_ids)
    assert seen == list(range(len(seqs)))
    for b in batches:
        assert b.num_tokens <= 64 or b.num_seqs == 1
        assert b.cu_seqlens[-1] == b.num_tokens
        # positions restart per sequence; no padding anywhere
        for j, n in enumerate(b.seq_lens):
            assert b.positions[b.cu_seqlens[j] : b.cu_seqlens[j + 1]].tolist() == list(range(n))
            assert (
                b.token_ids[b.cu_seqlens[j] : b.cu_seqlens[j + 1]].tolist() == seqs[b.item_ids[j]]
            )
        assert b.token_ids.dtype == b.positions.dtype == np.int64
    # an empty forward list, and the same plan from the index groups the Engine packs lazily
    assert plan_embed_batches([], 64, 512) == []
    groups = plan_embed_groups(seqs, max_batch_tokens=64, max_batch_size=512)
    assert [list(b.item_ids) for b in batches] == groups
    # longest first
    firsts = [max(b.seq_lens) for b in batches]
    assert firsts == sorted(firsts, reverse=True)

    small = Engine(qwen3_engine.model_dir, device="cpu", dtype="float32", max_batch_tokens=64)
    got = small.embed(seqs, show_progress=False)
    ref = qwen3_engine.embed(seqs, show_progress=False)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for i in (0, 7, 24):
        np.testing.assert_allclose(got[i], qwen3_engine.embed([seqs[i]])[0], atol=1e-5)


def test_progress_bar_when_several_forwards(
    qwen3_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    small = Engine(qwen3_engine.model_dir, device="cpu", dtype="float32", max_batch_tokens=32)
    small.embed(_seqs(12), show_progress=True)
    assert "embedding" in capsys.readouterr().err
    small.embed(_seqs(12), show_progress=False)
    assert capsys.readouterr().err == ""


def test_single_string_and_token_list(qwen3_engine: Engine) -> None:
    one = qwen3_engine.embed("hello world")
    assert one.shape == (1, 64) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-6)
    ids = qwen3_engine.tokenize(["hello world"])[0]
    np.testing.assert_allclose(qwen3_engine.embed(ids), one, atol=1e-6)


BAD = [
    ([], "empty"),
    (["ok", ""], "empty string"),
    ([[1, 2], []], "empty token list"),
    ([[1, 5000]], "outside [0, 1024)"),
    ([[-1]], "outside"),
    ([["a", 1]], "integers only"),
    ([3.5], "expected a string"),
]


@pytest.mark.parametrize("inputs,needle", BAD)
def test_bad_inputs_raise_input_error(qwen3_engine: Engine, inputs: object, needle: str) -> None:
    with pytest.raises(InputError, match=None) as exc:
        qwen3_engine.embed(inputs)
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)
    # the engine still works afterwards
    assert qwen3_engine.embed(["still fine"]).shape == (1, 64)


@pytest.mark.parametrize("dims", [0, -3, 65, 2.5, True])
def test_bad_dimensions(qwen3_engine: Engine, dims: object) -> None:
    with pytest.raises(InputError, match="dimensions"):
        qwen3_engine.embed(["x"], dimensions=dims)  # type: ignore[arg-type]
    assert qwen3_engine.embed(["x"], dimensions=64).shape == (1, 64)


def test_over_limit_without_truncation(tiny_qwen3: Path) -> None:
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", max_input_tokens=6)
    with pytest.raises(InputError, match="max_input_tokens=6"):
        engine.embed(["one two three four five six seven eight nine"], truncate=False)
    with pytest.raises(InputError, match="7 tokens, over max_input_tokens=6"):
        engine.embed([[1, 2, 3, 4, 5, 6, 7]], truncate=False)
    assert engine.embed([[1, 2, 3, 4, 5, 6, 7]], truncate=True).shape == (1, 64)
    assert engine.embed(["one two three four five six seven eight nine"]).shape == (1, 64)


def test_prompts_by_name_and_literal(tmp_path: Path, tiny_qwen3: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_qwen3, model)
    (model / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": "Instruct: find it\nQuery:", "document": ""},
                "default_prompt_name": None,
            }
        )
    )
    engine = Engine(model, device="cpu", dtype="float32")
    a = engine.embed(["cats"], prompt_name="query")
    b = engine.embed(["Instruct: find it\nQuery:cats"])
    c = engine.embed(["cats"], prompt="Instruct: find it\nQuery:")
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert np.abs(a - engine.embed(["cats"])).max() > 1e-3
    with pytest.raises(InputError, match="unknown prompt_name 'passage'.*document, query"):
        engine.embed(["cats"], prompt_name="passage")


def test_model_without_tokenizer_takes_token_ids_only(tmp_path: Path, tiny_qwen3: Path) -> None:
    model = tmp_path / "notok"
    shutil.copytree(tiny_qwen3, model)
    (model / "tokenizer.json").unlink()
    engine = Engine(model, device="cpu", dtype="float32")
    assert engine.embed([[1, 2, 3]]).shape == (1, 64)
    with pytest.raises(InputError, match="no tokenizer.json: give token ids"):
        engine.embed(["text"])


def test_mean_and_cls_pooling_from_sentence_transformers_files(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    import torch

    model = tmp_path / "pool"
    shutil.copytree(tiny_qwen3, model)
    (model / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (model / "1_Pooling").mkdir()
    seqs = [[4, 5, 6, 7], [9, 10]]
    ref_engine = Engine(tiny_qwen3, device="cpu", dtype="float32")
    from slipstream.attention import AttentionMetadata

    hidden = []
    for s in seqs:
        meta = AttentionMetadata.from_seq_lens([len(s)], True, "cpu")
        with torch.inference_mode():
            hidden.append(ref_engine.runner.model(torch.tensor(s), torch.arange(len(s)), meta))
    for mode, key, expect in [
        ("mean", "pooling_mode_mean_tokens", [h.mean(0) for h in hidden]),
        ("cls", "pooling_mode_cls_token", [h[0] for h in hidden]),
        ("last", "pooling_mode_lasttoken", [h[-1] for h in hidden]),
    ]:
        (model / "1_Pooling" / "config.json").write_text(json.dumps({key: True}))
        engine = Engine(model, device="cpu", dtype="float32")
        assert engine.model_config.pooling.mode == mode
        got = engine.embed(seqs, normalize=False)
        np.testing.assert_allclose(got, torch.stack(expect).numpy(), atol=1e-5)


@pytest.mark.parametrize("engine_name", ["qwen3_engine", "minilm_engine"])
def test_flash_backend_equals_torch_backend(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    """End to end through the Triton kernel (interpreter on CPU): same embeddings as the
    torch reference, and the debug check confirms every output row was written in place."""
    ref_engine: Engine = request.getfixturevalue(engine_name)
    flash = Engine(
        ref_engine.model_dir,
        device="cpu",
        dtype="float32",
        attention_backend="flash",
        debug_checks=True,
    )
    inputs = ["a short one", "the quick brown fox jumps over the lazy dog, twice over", "x"]
    a = flash.embed(inputs)
    b = ref_engine.embed(inputs)
    cos = (a.astype(np.float64) * b).sum(1)
    assert cos.min() >= 0.99999, cos
