"""One place that registers slipstream's Triton ops with ``torch.library``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# (name, schema, implementation, fake implementation)
OpSpec = tuple[str, str, Callable[..., Any], Callable[..., Any]]


def op_registered(name: str) -> bool:
    try:
        getattr(torch.ops.slipstream, name).default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def register_ops(ops: Sequence[OpSpec]) -> torch.library.Library | None:
    """Define each op not yet registered, with the same implementation on CPU (the Triton
    interpreter, for tests) and CUDA, and its fake (meta) implementation.

    Returns the Library, which the caller must keep alive (its registrations die with it),
    or None when every op was already registered (the module imported under another name).
    """
    todo = [op for op in ops if not op_registered(op[0])]
    if not todo:
        return None
    lib = torch.library.Library("slipstream", "FRAGMENT")
    for name, schema, impl, fake in todo:
        lib.define(schema)
        lib.impl(name, impl, "CPU")
        lib.impl(name, impl, "CUDA")
        torch.library.register_fake(f"slipstream::{name}", fake, lib=lib)
    return lib
