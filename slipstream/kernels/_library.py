"""One place that registers slipstream's Triton ops with ``torch.library``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Parameters do not go through Python dispatch: a norm weight is as plain as a tensor here.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_direct_ok(*tensors: Any) -> bool:
    """True for a plain eager call, where a wrapper may launch its kernel directly instead of
    going through ``torch.ops.slipstream.*``: not compiling, no Python dispatch /
    torch-function mode active (make_fx, FakeTensorMode, a torch.device(...) context, ...), no
    functorch transform (vmap / grad / functionalize wrap tensors in plain-typed wrappers), no
    profiler running (under the profiler the op path shows up as a named ``slipstream::`` region,
    which copy-attribution tools rely on), and all ``tensors`` plain."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch.autograd.profiler._is_profiler_enabled:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


_NO_SWITCH = contextlib.nullcontext()  # reusable: entering it does nothing


def device_ctx(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """What a kernel launch for ``device`` runs under: Triton launches on the current CUDA
    device, so switch to ``device`` only when it is another one (switching costs a few us)."""
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(device)
    return _NO_SWITCH


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
