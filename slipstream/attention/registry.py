"""Attention backends by name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slipstream.attention.base import AttentionBackend
from slipstream.errors import ConfigError

_BACKENDS: dict[str, Callable[[], type[AttentionBackend]]] = {}


def register_backend(name: str, loader: Callable[[], type[AttentionBackend]]) -> None:
    """Register a backend class lazily (the flash backend imports Triton only when chosen)."""
    _BACKENDS[name] = loader


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[AttentionBackend]:
    try:
        loader = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        ) from None
    return loader()


def default_backend(device: str) -> str:
    """flash (Triton) on CUDA when Triton is importable, else the torch reference."""
    if device.startswith("cuda") and torch.cuda.is_available() and "flash" in _BACKENDS:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "flash"
    return "torch"


def _torch() -> type[AttentionBackend]:
    from slipstream.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend


def _flash() -> type[AttentionBackend]:
    try:
        from slipstream.attention.flash_backend import FlashAttentionBackend
    except ImportError as e:  # triton missing
        raise ConfigError(f"attention backend 'flash' needs Triton: {e}") from e
    return FlashAttentionBackend


register_backend("torch", _torch)
register_backend("flash", _flash)
