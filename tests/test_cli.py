"""The command line: `slipstream embed`, `make-checkpoint`, errors, and `python -m`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream import Engine
from slipstream.cli import main


def test_embed_json_equals_engine(tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "embed",
            "hello world",
            "the cat",
            "--model",
            str(tiny_qwen3),
            "--device",
            "cpu",
            "--dimensions",
            "32",
            "--json",
        ]
    )
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["dimensions"] == 32
    got = np.array(payload["embeddings"], dtype=np.float32)
    ref = Engine(tiny_qwen3, device="cpu").embed(["hello world", "the cat"], dimensions=32)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_embed_several_texts_prints_cosine_table(
    tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", "a b c", "a b d", "zzz", "--model", str(tiny_qwen3)]) == 0
    out = capsys.readouterr().out
    assert "3 vector(s) of 64 dimensions" in out
    assert "pairwise cosine similarity" in out
    assert out.count("1.000") >= 3  # the diagonal


def test_errors_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["embed", "x", "--dimensions", "0"]) == 2
    assert "dimensions must be between 1 and 384" in capsys.readouterr().err


def test_make_checkpoint_then_embed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    assert (
        main(
            [
                "make-checkpoint",
                "--preset",
                "qwen3-tiny",
                "--out",
                str(out),
                "--layout",
                "model",
                "--dtype",
                "float32",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3Model"] and cfg["num_key_value_heads"] == 2
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert Engine(out, device="cpu").embed("text works too").shape == (1, 64)


def test_python_dash_m_is_the_same_cli(tiny_qwen3: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "slipstream", "embed", "hi", "--model", str(tiny_qwen3), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["embeddings"][0]) == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "x"],
        ["serve"],
        ["bench", "embed"],
    ],
)
def test_quantization_options_reach_the_engine(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--quantization / --fp8-skip-layers parse on every engine command and engine_from_args
    hands them to Engine; fp8 on a CPU-only machine is refused with a clear error."""
    import slipstream
    from slipstream.cli import build_parser, engine_from_args
    from slipstream.config import DEFAULT_FP8_SKIP_LAYERS

    full = [*argv, "--quantization", "fp8", "--fp8-skip-layers", "3"]
    args = build_parser(full).parse_args(full)
    assert args.quantization == "fp8" and args.fp8_skip_layers == 3
    default = build_parser(argv).parse_args(argv)
    assert default.quantization is None and default.fp8_skip_layers == DEFAULT_FP8_SKIP_LAYERS

    seen: dict[str, object] = {}
    monkeypatch.setattr(slipstream, "Engine", lambda **kw: seen.update(kw))
    engine_from_args(args)
    assert seen["quantization"] == "fp8" and seen["fp8_skip_layers"] == 3


def test_fp8_on_cpu_is_a_clear_cli_error(
    tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    argv = ["embed", "x", "--model", str(tiny_qwen3), "--device", "cpu", "--quantization", "fp8"]
    assert main(argv) == 2
    assert "fp8" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["embed", "x"], ["generate", "x"], ["serve"], ["bench", "embed"]])
def test_disable_cuda_graph_reaches_the_engine(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--disable-cuda-graph (embedding forwards and decode steps) parses on every engine
    command, defaults to off, and engine_from_args hands it to Engine."""
    import slipstream
    from slipstream.cli import build_parser, engine_from_args

    assert build_parser(argv).parse_args(argv).disable_cuda_graph is False
    full = [*argv, "--disable-cuda-graph"]
    args = build_parser(full).parse_args(full)
    seen: dict[str, object] = {}
    monkeypatch.setattr(slipstream, "Engine", lambda **kw: seen.update(kw))
    engine_from_args(args)
    assert seen["disable_cuda_graph"] is True
