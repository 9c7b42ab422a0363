"""Attention backends: the ABC, the metadata, and a registry by name."""

from slipstream.attention.base import AttentionBackend, AttentionMetadata
from slipstream.attention.registry import (
    available_backends,
    default_backend,
    get_backend_class,
    register_backend,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "default_backend",
    "get_backend_class",
    "register_backend",
]
