"""slipstream: a zero-copy, padding-free inference engine for transformer embedding models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slipstream.engine.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy so that `import slipstream.errors` (and the CLI's --help) stays cheap.
    if name == "Engine":
        from slipstream.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'slipstream' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
