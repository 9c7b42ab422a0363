"""Config and loader errors name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slipstream import Engine
from slipstream.config import ModelConfig
from slipstream.errors import ConfigError, ModelLoadError, UnsupportedModelError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model folder not found: .*nope"):
        Engine(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        Engine(tmp_path / "empty")


def test_unknown_model_type_and_architecture(tmp_path: Path, tiny_qwen3: Path) -> None:
    m = _copy(tiny_qwen3, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="'llama'.*supported model types: bert, qwen3"):
        ModelConfig.from_hf(m)
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="'Qwen3MoeForCausalLM'.*Qwen3ForCausalLM"):
        ModelConfig.from_hf(m)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    m = _copy(tiny_qwen3, tmp_path / "m")
    tensors = load_file(m / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    save_file(missing, m / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"layers\.1\.self_attn\.qkv_proj\.weight \(partition k\)"
    ):
        Engine(m)
    extra = dict(tensors)
    extra["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(extra, m / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected key 'model.layers.0.mlp.surprise.weight'"):
        Engine(m)
    wrong = dict(tensors)
    wrong["model.norm.weight"] = torch.zeros(3)
    save_file(wrong, m / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has shape \(3,\)"):
        Engine(m)


def test_no_safetensors(tmp_path: Path, tiny_qwen3: Path) -> None:
    m = _copy(tiny_qwen3, tmp_path / "m")
    (m / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        Engine(m)


def test_bad_engine_settings(tiny_qwen3: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        Engine(tiny_qwen3, dtype="float8")
    with pytest.raises(
        ConfigError, match="unknown attention backend 'nope'; available: flash, torch"
    ):
        Engine(tiny_qwen3, attention_backend="nope")
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        Engine(tiny_qwen3, max_batch_tokens=0)
    with pytest.raises(ConfigError, match=r"max_input_tokens must be in \[1, 2048\]"):
        Engine(tiny_qwen3, max_input_tokens=4096)


def test_bf16_checkpoint_into_fp32_and_back(tmp_path: Path) -> None:
    from slipstream.checkpoint import make_checkpoint

    m = make_checkpoint("qwen3-tiny", tmp_path / "bf16", dtype="bfloat16")
    e32 = Engine(m, device="cpu", dtype="float32")
    e16 = Engine(m, device="cpu", dtype="bfloat16")
    assert e32.runner.model.embed_tokens.weight.dtype == torch.float32
    assert e16.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    a, b = e32.embed([[1, 2, 3, 4]]), e16.embed([[1, 2, 3, 4]])
    assert float((a * b).sum()) > 0.99
