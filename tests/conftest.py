"""Shared fixtures. Triton kernels run under the interpreter when there is no GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: @triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from slipstream.checkpoint import make_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random qwen3-tiny checkpoint (fp32, with tokenizer), made by slipstream itself."""
    out = tmp_path_factory.mktemp("qwen3_tiny")
    return make_checkpoint("qwen3-tiny", out, seed=0, dtype="float32")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from slipstream.config import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def minilm_engine():  # type: ignore[no-untyped-def]
    from slipstream import Engine

    return Engine(device="cpu", dtype="float32", debug_checks=True)


@pytest.fixture(scope="session")
def qwen3_engine(tiny_qwen3: Path):  # type: ignore[no-untyped-def]
    from slipstream import Engine

    return Engine(tiny_qwen3, device="cpu", dtype="float32", debug_checks=True)
