"""``slipstream profile-copies``: count the copies one forward pass makes, per decoder layer.

The engine's claim is that no tensor is copied on the device unless the math needs it; this
command checks it. It runs a forward (after a warm-up one) under ``torch.profiler`` and
attributes every device event to the decoder layer whose ``record_function``
range (``slipstream::layer_{i}``, set by the model) encloses the CPU op that launched it.

How events are attributed (only FunctionEvent attributes that torch 2.x has long had are
used; ``input_dtypes``, missing in older versions, falls back to the raw Kineto events):

* ``prof.events()`` is a tree of CPU-side ``FunctionEvent``s (``cpu_children``, built by
  nesting of time ranges on a thread). On CUDA, the profiler links each GPU kernel / memcpy
  to the innermost CPU op that launched it (by correlation id) and lists it in that op's
  ``kernels`` (``Kernel(name, device, duration)``, duration in us). That is the link
  ``key_averages()`` itself uses for device time, so it is the stable one.
* We walk the tree from the top; entering ``slipstream::layer_{i}`` sets the layer, and
  entering ``slipstream::attention`` (a range this module adds around every
  ``slipstream.layers.attention.Attention`` module for the profiled pass only) marks the
  attention region.
* A *copy* (what ``dtod_*`` counts) is pure data movement on the device: a
  ``Memcpy DtoD`` event, or a kernel launched under an ``aten::copy_`` whose destination and
  source have the same dtype (a strided copy is an elementwise kernel, not a memcpy, so
  counting memcpys alone would miss e.g. the torch backend's ``out.copy_(res.transpose())``).
  A dtype conversion (``x.float()`` in RMSNorm) is math, not a copy: it is left out of
  ``dtod_*`` but counted with the other copy-family kernels in ``copy_kernels_*``
  (everything launched under ``copy_``/``_to_copy``/``clone``/``contiguous``/``cat``, or
  whose kernel name contains "copy").
* On CPU there are no device events; the same keys then count the outermost ``aten::copy_``
  calls with equal dtypes (``dtod_*``) and every ``aten::copy_``/``aten::cat`` call
  (``copy_kernels_*``), timed on the CPU. ``device`` says ``cpu``.

``attn_output_copies_per_layer`` counts the copies made inside the attention region whose
destination has the attention output's shape ``[n, Hq, D]`` or ``[n, Hq * D]``: the torch
reference backend makes one per sequence per layer, the flash backend none.
On CPU the Triton kernels run in the Triton interpreter, which copies each argument's
storage back after every launch (1-D byte copies, or copies inside a slipstream kernel op);
those are counted in ``dtod_events_emulation_per_layer`` (always 0 on CUDA), and
``dtod_events_model_per_layer`` is ``dtod_events_per_layer`` without them.

``device_events_total`` counts the device events linked to a CPU op (all of them are
attributable); ``device_events_listed`` every device event the profiler saw (Triton kernels
launched from Python outside any aten op are listed but linked to nothing). A memcpy DtoD
linked to nothing is counted in ``dtod_events_unlinked`` and in the totals.

``attribution_ok`` is false (with a ``warning``) when no layer range was recorded (e.g. a
CUDA graph replay) or when, on CUDA, no device event at all was linked to an op inside the
layers: then the zeros mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

from slipstream.errors import SlipstreamError

logger = logging.getLogger("slipstream.bench")

LAYER_RE = re.compile(r"^slipstream::layer_(\d+)$")
ATTENTION_RANGE = "slipstream::attention"

DTOD_DEFINITION = {
    "cuda": "device events that only move data: Memcpy DtoD, and kernels launched under an "
    "aten::copy_ whose destination and source dtypes are equal (dtype casts excluded)",
    "cpu": "outermost aten::copy_ calls whose destination and source dtypes are equal "
    "(dtype casts excluded); time is CPU time",
}

# Ops whose device work is data movement (possibly with a dtype conversion).
COPY_FAMILY = frozenset(
    {
        "aten::copy_",
        "aten::_to_copy",
        "aten::to",
        "aten::clone",
        "aten::contiguous",
        "aten::cat",
        "aten::_cat",
        "aten::stack",
        "aten::index_copy_",
        "aten::_copy_from",
        "aten::_copy_from_and_resize",
    }
)
_CPU_CAT_OPS = ("aten::cat", "aten::_cat")

# Profiler dtype strings (c10 type names) -> bytes per element.
_ELEMENT_SIZE = {
    "float": 4,
    "double": 8,
    "c10::half": 2,
    "c10::bfloat16": 2,
    "half": 2,
    "bfloat16": 2,
    "long int": 8,
    "long": 8,
    "int": 4,
    "short int": 2,
    "short": 2,
    "signed char": 1,
    "unsigned char": 1,
    "char": 1,
    "bool": 1,
    "c10::complex<float>": 8,
    "c10::complex<double>": 16,
}


def element_size(dtype_name: str | None, default: int) -> int:
    if not dtype_name:
        return default
    key = dtype_name.strip().lower()
    if key in _ELEMENT_SIZE:
        return _ELEMENT_SIZE[key]
    if "float8" in key:
        return 1
    return default


def _numel(shape: Any) -> int | None:
    if not isinstance(shape, (list, tuple)):
        return None
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Attribution (pure: works on any tree of FunctionEvent-like objects, so it is unit-tested
# on CPU with synthetic CUDA-style events).
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class CopyRecord:
    layer: int | None
    kind: str  # "memcpy_dtod" | "copy_kernel" | "cpu_copy"
    is_dtod: bool  # a pure copy (counted in dtod_*)
    is_copy_kernel: bool  # in the broad copy family (counted in copy_kernels_*)
    name: str  # kernel / memcpy name, or the CPU op name
    op: str  # launching CPU op
    shape: tuple[int, ...] | None  # destination shape of the enclosing aten::copy_
    dtypes: tuple[str, ...] | None  # (dst, src) dtypes of the enclosing aten::copy_
    bytes: int
    time_us: float
    in_attention: bool
    attn_output: bool
    # CPU only: a copy the Triton *interpreter* makes (its argument write-back after each
    # launch: 1-D byte copies of whole storages, or anything inside a slipstream kernel op).
    emulation: bool = False
    parent: str = ""  # nearest enclosing op outside the copy family (who asked for the copy)


@dataclass(slots=True)
class Attribution:
    records: list[CopyRecord] = field(default_factory=list)
    layers_seen: set[int] = field(default_factory=set)
    attention_region_seen: bool = False
    device_events_in_layers: int = 0  # every kernel/memcpy linked to an op inside a layer
    device_time_in_layers_us: float = 0.0
    device_events_total: int = 0
    device_time_total_us: float = 0.0
    memcpy_other_events: int = 0  # HtoD / DtoH, never counted as copies on the device
    # Device-side events as listed by the profiler (linked to an op or not), to catch a
    # memcpy DtoD that no CPU op claims (it would be missing from the per-layer counts).
    device_events_listed: int = 0
    device_time_listed_us: float = 0.0
    dtod_memcpy_listed: int = 0
    dtod_memcpy_listed_us: float = 0.0
    dtod_memcpy_linked: int = 0
    dtod_memcpy_linked_us: float = 0.0


DtypeLookup = Callable[[Any], "list[str] | None"]


def _event_dtypes(evt: Any, lookup: DtypeLookup | None) -> list[str] | None:
    dts = getattr(evt, "input_dtypes", None)
    if dts:
        return [str(d) for d in dts]
    if lookup is not None:
        return lookup(evt)
    return None


def _is_dtod_memcpy(name: str) -> bool:
    low = name.lower()
    return "memcpy" in low and ("dtod" in low or "ptop" in low or "device -> device" in low)


def _is_cpu(evt: Any) -> bool:
    return getattr(evt, "device_type", DeviceType.CPU) == DeviceType.CPU


def attribute_copies(
    events: Iterable[Any],
    *,
    device_kind: str,
    num_heads: int,
    head_dim: int,
    default_element_size: int,
    dtype_lookup: DtypeLookup | None = None,
) -> Attribution:
    """Classify every copy in a profiled forward and attribute it to its decoder layer.

    ``events``: ``prof.events()`` (or look-alikes with ``name``, ``device_type``,
    ``cpu_parent``, ``cpu_children``, ``kernels``, ``input_shapes``, optional
    ``input_dtypes``, ``time_range``, ``is_async``). ``device_kind``: ``"cuda"`` counts device
    events linked to CPU ops; ``"cpu"`` counts the CPU copy ops themselves.
    """
    events = list(events)
    annotation_names = {
        e.name
        for e in events
        if getattr(e, "is_user_annotation", False) or e.name.startswith("slipstream::layer_")
    }
    annotation_names.add(ATTENTION_RANGE)
    roots = [
        e
        for e in events
        if _is_cpu(e) and not getattr(e, "is_async", False) and e.cpu_parent is None
    ]
    roots.sort(key=lambda e: e.time_range.start)
    att = Attribution()
    copy_info: dict[int, tuple[tuple[int, ...] | None, tuple[str, ...] | None, bool]] = {}
    billed: set[int] = set()  # copy ops whose bytes were already counted once

    def copy_op_info(op: Any) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None, bool]:
        """(dst shape, (dst, src) dtypes, is_pure) of an aten::copy_ event."""
        key = id(op)
        if key not in copy_info:
            shapes = getattr(op, "input_shapes", None) or []
            dst = None
            if shapes and _numel(shapes[0]) is not None:
                dst = tuple(int(s) for s in shapes[0])
            dts = _event_dtypes(op, dtype_lookup)
            pair = (str(dts[0]), str(dts[1])) if dts and len(dts) >= 2 else None
            if pair is not None:
                pure = pair[0] == pair[1]
            else:  # unknown dtypes: a copy_ under _to_copy is a conversion (or a transfer)
                pure = not _has_ancestor(op, "aten::_to_copy")
            copy_info[key] = (dst, pair, pure)
        return copy_info[key]

    def copy_bytes(op: Any | None, launching: Any) -> int:
        if op is not None:
            dst, pair, _ = copy_op_info(op)
            n = _numel(dst) if dst is not None else None
            if n is None:
                return 0
            return n * element_size(pair[0] if pair else None, default_element_size)
        shapes = getattr(launching, "input_shapes", None) or []
        n = _numel(shapes[0]) if shapes else None
        dts = _event_dtypes(launching, dtype_lookup)
        return (n or 0) * element_size(dts[0] if dts else None, default_element_size)

    def is_attn_output(shape: tuple[int, ...] | None) -> bool:
        if not shape:
            return False
        if len(shape) == 3:
            return shape[1] == num_heads and shape[2] == head_dim
        if len(shape) == 2:
            return shape[1] == num_heads * head_dim
        return False

    # Iterative DFS: (event, layer, in_attention, outermost copy_ op, in_copy_family,
    # in_kernel_op)
    stack: list[tuple[Any, int | None, bool, Any | None, bool, bool]] = [
        (r, None, False, None, False, False) for r in reversed(roots)
    ]
    while stack:
        evt, layer, in_attn, copy_op, in_family, in_kop = stack.pop()
        m = LAYER_RE.match(evt.name)
        if m:
            layer = int(m.group(1))
            att.layers_seen.add(layer)
        elif evt.name == ATTENTION_RANGE:
            in_attn = True
            att.attention_region_seen = True
        elif evt.name.startswith("slipstream::") and evt.name not in annotation_names:
            in_kop = True
        outermost_copy = False
        if evt.name == "aten::copy_" and copy_op is None:
            copy_op = evt
            outermost_copy = True
        if evt.name in COPY_FAMILY:
            in_family = True

        if device_kind == "cuda":
            for k in getattr(evt, "kernels", None) or []:
                kname = str(k.name)
                if kname in annotation_names:
                    continue  # the GPU-side mirror of a record_function range
                dur = float(k.duration)
                att.device_events_total += 1
                att.device_time_total_us += dur
                if layer is not None:
                    att.device_events_in_layers += 1
                    att.device_time_in_layers_us += dur
                low = kname.lower()
                if "memset" in low:
                    continue
                shape = dtypes = None
                if copy_op is not None:
                    shape, dtypes, pure = copy_op_info(copy_op)
                else:
                    pure = False
                if "memcpy" in low:
                    if not _is_dtod_memcpy(kname):
                        att.memcpy_other_events += 1
                        continue
                    kind, is_dtod, is_family = "memcpy_dtod", True, False
                    att.dtod_memcpy_linked += 1
                    att.dtod_memcpy_linked_us += dur
                else:
                    kind = "copy_kernel"
                    is_family = in_family or "copy" in low
                    is_dtod = copy_op is not None and pure
                    if not (is_family or is_dtod):
                        continue
                owner = copy_op if copy_op is not None else evt
                nbytes = 0
                first = is_dtod and id(owner) not in billed
                if first:  # bytes and the attention-output count go once per copy call
                    billed.add(id(owner))
                    nbytes = copy_bytes(copy_op, evt)
                att.records.append(
                    CopyRecord(
                        layer=layer,
                        kind=kind,
                        is_dtod=is_dtod,
                        is_copy_kernel=is_family,
                        name=kname,
                        op=owner.name,
                        shape=shape,
                        dtypes=dtypes,
                        bytes=nbytes,
                        time_us=dur,
                        in_attention=in_attn,
                        attn_output=first and in_attn and is_attn_output(shape),
                        parent=_caller(owner),
                    )
                )
        elif device_kind == "cpu":
            parent = evt.cpu_parent
            outermost_cat = (
                evt.name in _CPU_CAT_OPS
                and copy_op is None
                and (parent is None or parent.name not in _CPU_CAT_OPS)
            )
            if outermost_copy or outermost_cat:
                if evt.name == "aten::copy_":
                    shape, dtypes, pure = copy_op_info(evt)
                    nbytes = copy_bytes(evt, evt) if pure else 0
                else:  # cat: a copy-family op, never a "pure copy" of one tensor
                    shape, dtypes, pure, nbytes = None, None, False, 0
                att.records.append(
                    CopyRecord(
                        layer=layer,
                        kind="cpu_copy",
                        is_dtod=pure,
                        is_copy_kernel=True,
                        name=evt.name,
                        op=evt.name,
                        shape=shape,
                        dtypes=dtypes,
                        bytes=nbytes,
                        time_us=float(evt.time_range.end - evt.time_range.start),
                        in_attention=in_attn,
                        attn_output=pure and in_attn and is_attn_output(shape),
                        emulation=pure and (in_kop or _is_storage_copy(shape, dtypes)),
                        parent=_caller(evt),
                    )
                )
        else:
            raise ValueError(f"device_kind must be 'cuda' or 'cpu', got {device_kind!r}")

        children = sorted(evt.cpu_children, key=lambda e: e.time_range.start)
        for child in reversed(children):
            stack.append((child, layer, in_attn, copy_op, in_family, in_kop))

    if device_kind == "cuda":
        for e in events:
            if _is_cpu(e) or e.name in annotation_names or getattr(e, "is_user_annotation", False):
                continue
            dur = float(e.time_range.end - e.time_range.start)
            att.device_events_listed += 1
            att.device_time_listed_us += dur
            if _is_dtod_memcpy(e.name):
                att.dtod_memcpy_listed += 1
                att.dtod_memcpy_listed_us += dur
    return att


def _is_storage_copy(shape: tuple[int, ...] | None, dtypes: tuple[str, ...] | None) -> bool:
    """``UntypedStorage.copy_``: a 1-D copy of raw bytes (no model tensor is uint8)."""
    return bool(shape is not None and len(shape) == 1 and dtypes and dtypes[0] == "unsigned char")


def _caller(evt: Any) -> str:
    """Name of the nearest ancestor of ``evt`` that is not itself a copy-family op."""
    p = evt.cpu_parent
    while p is not None and p.name in COPY_FAMILY:
        p = p.cpu_parent
    return "" if p is None else str(p.name)


def _has_ancestor(evt: Any, name: str) -> bool:
    p = evt.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        if LAYER_RE.match(p.name):
            return False
        p = p.cpu_parent
    return False


def summarize(
    att: Attribution, num_layers: int, *, attention_region: bool = True
) -> dict[str, Any]:
    """Per-layer and total counts from an Attribution (the JSON's copy keys)."""
    n = max([num_layers, *(i + 1 for i in att.layers_seen)])
    ev = [0] * n
    by = [0] * n
    tm = [0.0] * n
    ck = [0] * n
    ckt = [0.0] * n
    mc = [0] * n
    ao = [0] * n
    em = [0] * n
    out_ev = out_by = out_ck = 0
    # memcpy DtoD the profiler listed but linked to no CPU op: counted in the totals only
    unlinked = max(0, att.dtod_memcpy_listed - att.dtod_memcpy_linked)
    unlinked_us = max(0.0, att.dtod_memcpy_listed_us - att.dtod_memcpy_linked_us)
    out_tm = out_ckt = 0.0
    breakdown: Counter[tuple[Any, ...]] = Counter()
    bd_time: dict[tuple[Any, ...], float] = defaultdict(float)
    bd_bytes: dict[tuple[Any, ...], int] = defaultdict(int)
    for r in att.records:
        key = (r.kind, r.is_dtod, r.op, r.name[:120], r.shape, r.dtypes, r.parent)
        breakdown[key] += 1
        bd_time[key] += r.time_us
        bd_bytes[key] += r.bytes
        if r.layer is None:
            if r.is_dtod:
                out_ev += 1
                out_by += r.bytes
                out_tm += r.time_us
            if r.is_copy_kernel:
                out_ck += 1
                out_ckt += r.time_us
            continue
        i = r.layer
        if r.is_dtod:
            ev[i] += 1
            by[i] += r.bytes
            tm[i] += r.time_us
        if r.is_copy_kernel:
            ck[i] += 1
            ckt[i] += r.time_us
        if r.kind == "memcpy_dtod":
            mc[i] += 1
        if r.attn_output:
            ao[i] += 1
        if r.is_dtod and r.emulation:
            em[i] += 1
    top = sorted(breakdown.items(), key=lambda kv: -bd_time[kv[0]])[:25]
    return {
        "num_layers": num_layers,
        "dtod_events_per_layer": ev,
        "dtod_bytes_per_layer": by,
        "dtod_time_us_per_layer": [round(t, 3) for t in tm],
        "dtod_events_outside_layers": out_ev,
        "dtod_bytes_outside_layers": out_by,
        "dtod_time_us_outside_layers": round(out_tm, 3),
        "dtod_events_unlinked": unlinked,
        "dtod_time_us_unlinked": round(unlinked_us, 3),
        "dtod_events_total": sum(ev) + out_ev + unlinked,
        "dtod_bytes_total": sum(by) + out_by,
        "dtod_time_us_total": round(sum(tm) + out_tm + unlinked_us, 3),
        "memcpy_dtod_events_per_layer": mc,
        "copy_kernels_per_layer": ck,
        "copy_kernel_time_us_per_layer": [round(t, 3) for t in ckt],
        "copy_kernels_outside_layers": out_ck,
        "copy_kernels_total": sum(ck) + out_ck,
        "copy_kernel_time_us_total": round(sum(ckt) + out_ckt, 3),
        "attn_output_copies_per_layer": ao,
        "attn_output_copies_total": sum(ao),
        "dtod_events_emulation_per_layer": em,
        "dtod_events_model_per_layer": [a - b for a, b in zip(ev, em, strict=True)],
        "attention_region_found": att.attention_region_seen and attention_region,
        "layers_found": len(att.layers_seen),
        "device_events_in_layers": att.device_events_in_layers,
        "device_time_us_in_layers": round(att.device_time_in_layers_us, 3),
        "device_events_total": att.device_events_total,
        "device_time_us_total": round(att.device_time_total_us, 3),
        "device_events_listed": att.device_events_listed,
        "device_time_us_listed": round(att.device_time_listed_us, 3),
        "memcpy_other_events": att.memcpy_other_events,
        "copy_breakdown": [
            {
                "kind": k[0],
                "dtod": k[1],
                "op": k[2],
                "name": k[3],
                "shape": list(k[4]) if k[4] is not None else None,
                "dtypes": list(k[5]) if k[5] is not None else None,
                "count": c,
                "time_us": round(bd_time[k], 3),
                "bytes": bd_bytes[k],
                "called_from": k[6],
            }
            for k, c in top
        ],
    }


# ---------------------------------------------------------------------------------------
# Running a profiled forward
# ---------------------------------------------------------------------------------------


class DecodeProfileUnavailable(SlipstreamError):
    """``--phase decode`` needs the generation engine's profiling hook, which is missing."""


class _AttentionRanges:
    """Adds a ``slipstream::attention`` profiler range around every Attention module.

    Forward pre/post hooks, installed only for the profiled pass and removed after it, so the
    timed forwards run the model untouched.
    """

    def __init__(self, models: list[torch.nn.Module]) -> None:
        from slipstream.layers.attention import Attention

        seen: set[int] = set()
        self.modules: list[torch.nn.Module] = []
        for model in models:
            for m in model.modules():
                if isinstance(m, Attention) and id(m) not in seen:
                    seen.add(id(m))
                    self.modules.append(m)
        self.handles: list[Any] = []
        self.open: list[Any] = []

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        rf = torch.autograd.profiler.record_function(ATTENTION_RANGE)
        rf.__enter__()
        self.open.append(rf)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.open:
            self.open.pop().__exit__(None, None, None)

    def __enter__(self) -> _AttentionRanges:
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        while self.open:  # a forward that raised leaves its range open
            self.open.pop().__exit__(None, None, None)


def _kineto_dtype_lookup(prof: Any) -> DtypeLookup | None:
    """Fallback for torch versions whose FunctionEvent has no ``input_dtypes``: the raw
    Kineto events carry ``dtypes()`` keyed by the op's correlation id (== FunctionEvent.id).
    """
    try:
        raw = prof.profiler.kineto_results.events()
        table: dict[int, list[str]] = {}
        for e in raw:
            dts = list(e.dtypes())
            if dts:
                table.setdefault(int(e.correlation_id()), dts)
    except Exception:  # noqa: BLE001 - private API; attribution falls back to op names
        return None

    def lookup(evt: Any) -> list[str] | None:
        return table.get(int(getattr(evt, "id", -1)))

    return lookup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls (CUDA events on GPU, perf_counter on CPU)."""
    out: list[float] = []
    for _ in range(max(1, runs)):
        if device.type == "cuda":
            _sync(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


@dataclass(slots=True)
class _Step:
    """How to run the measured forward: plainly (timed) and under a given profiler."""

    run: Callable[[], float | None]  # one unprofiled forward; its ms, or None to time it here
    run_profiled: Callable[[Any], None]  # the same forward with the profiler active
    models: Callable[[], list[torch.nn.Module]]  # where the attention modules live


def _time_step(step: _Step, device: torch.device) -> float:
    """ms of one forward: as the step reports it (decode), else measured around the call."""
    reported: list[float | None] = []
    measured = time_call(lambda: reported.append(step.run()), device, 1)[0]
    return reported[0] if reported[0] is not None else measured


def _decode_step(engine: Any, batch: int, context_len: int, seed: int) -> _Step:
    import importlib
    import inspect

    try:
        generation = importlib.import_module("slipstream.engine.generation")
    except ModuleNotFoundError as e:
        if e.name != "slipstream.engine.generation":
            raise  # the module exists but something it imports is missing: show that
        raise _missing_decode() from e
    fn = getattr(generation, "run_decode_step_for_profile", None)
    if fn is None:
        raise _missing_decode()

    def models() -> list[torch.nn.Module]:
        found = [engine.runner.model]
        try:  # the generation machinery may hold its own model
            gen = engine.generation_engine() if hasattr(engine, "generation_engine") else None
            model = getattr(getattr(gen, "runner", None), "model", None)
            if isinstance(model, torch.nn.Module):
                found.append(model)
        except Exception:  # noqa: BLE001 - only used to place the attention ranges
            pass
        return found

    params = inspect.signature(fn).parameters
    if "profile" in params:
        # fn prefills outside the profiler and enters ``profile()`` around the decode step
        # only; it times that step itself (synchronised) and returns {"seconds": ...}.
        kw: dict[str, Any] = {"seed": seed} if "seed" in params else {}

        def run() -> float | None:
            out = fn(engine, batch, context_len, **kw)
            secs = out.get("seconds") if isinstance(out, dict) else None
            return None if secs is None else float(secs) * 1e3

        def run_profiled(prof: Any) -> None:
            fn(engine, batch, context_len, profile=lambda: prof, **kw)

        return _Step(run, run_profiled, models)

    def run_plain() -> float | None:
        fn(engine, batch, context_len)
        return None

    def run_profiled_plain(prof: Any) -> None:
        with prof:
            fn(engine, batch, context_len)

    return _Step(run_plain, run_profiled_plain, models)


def _missing_decode() -> DecodeProfileUnavailable:
    return DecodeProfileUnavailable(
        "--phase decode needs slipstream.engine.generation.run_decode_step_for_profile"
        "(engine, batch_size, context_len), which this checkout does not have yet"
    )


def profile_copies(
    engine: Any,
    tokens: int = 7168,
    batch: int = 1,
    *,
    phase: str = "embed",
    seed: int = 0,
    warmup: int = 1,
    timing_runs: int = 5,
    trace_path: str | Path | None = None,
) -> dict[str, Any]:
    """Profile one forward of ``engine`` and count its copies per layer (see module doc).

    ``tokens`` are split into ``batch`` sequences of ``tokens // batch`` random ids each
    (seeded). For ``phase="decode"`` the forward is one decode step of ``batch`` sequences
    with ``tokens // batch`` tokens of context, run by
    ``slipstream.engine.generation.run_decode_step_for_profile``.
    """
    from torch.profiler import ProfilerActivity, profile

    from slipstream.bench.workloads import random_token_ids
    from slipstream.engine.batch import Batch, Phase
    from slipstream.errors import ConfigError

    if batch < 1 or tokens < batch:
        raise ConfigError(f"need tokens >= batch >= 1, got tokens={tokens} batch={batch}")
    cfg = engine.model_config
    seq_len = tokens // batch
    if phase == "embed" and seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"{tokens} tokens in {batch} sequence(s) is {seq_len} per sequence, over the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings}); raise --batch"
        )
    device = engine.config.torch_device
    if phase == "embed":
        seqs = random_token_ids([seq_len] * batch, cfg.vocab_size, seed)
        packed = Batch.pack(seqs, list(range(batch)), Phase.EMBED)

        def eager_embed() -> None:
            # The eager forward: the kernels an embedding CUDA graph replays are these same
            # ones, but a replay hides the per-layer ranges the attribution needs. (The graph
            # path adds one [B, hidden] copy of the pooled rows, outside the layers.)
            runner = engine.runner
            graphs, runner.embed_graphs = runner.embed_graphs, None
            try:
                runner.embed(packed)  # runs under its own inference_mode
            finally:
                runner.embed_graphs = graphs

        def run_embed() -> float | None:
            eager_embed()
            return None

        def run_embed_profiled(prof: Any) -> None:
            with prof:
                eager_embed()
                _sync(device)

        step = _Step(run_embed, run_embed_profiled, lambda: [engine.runner.model])
    elif phase == "decode":
        step = _decode_step(engine, batch, seq_len, seed)
    else:
        raise ConfigError(f"phase must be 'embed' or 'decode', got {phase!r}")

    for _ in range(max(1, warmup)):
        step.run()
    _sync(device)
    times = [_time_step(step, device) for _ in range(max(1, timing_runs))]

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    ranges = _AttentionRanges(step.models())
    if device.type == "cuda":
        # A throwaway session first: CUPTI initialises lazily on the first one, which can
        # drop early activity records; the counted session then starts warm.
        with ranges:
            step.run_profiled(profile(activities=activities, record_shapes=True))
    prof = profile(activities=activities, record_shapes=True)
    with ranges:
        step.run_profiled(prof)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    events = prof.events()
    dtypes_in_events = any(getattr(e, "input_dtypes", None) for e in events)
    lookup = None if dtypes_in_events else _kineto_dtype_lookup(prof)
    att = attribute_copies(
        events,
        device_kind="cuda" if device.type == "cuda" else "cpu",
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        default_element_size=torch.empty((), dtype=engine.config.dtype).element_size(),
        dtype_lookup=lookup,
    )
    summary = summarize(att, cfg.num_layers, attention_region=bool(ranges.modules))
    forward_ms = statistics.median(times)
    backend = engine.config.attention_backend
    result: dict[str, Any] = {
        "model": str(engine.model_dir),
        "arch": cfg.arch,
        "backend": backend,
        "device": device.type,
        "device_name": _device_name(device),
        "dtype": str(engine.config.dtype).removeprefix("torch."),
        "quantization": engine.config.quantization,
        "phase": phase,
        "tokens": seq_len * batch,
        "batch": batch,
        "seq_len": seq_len,
        "context_len": seq_len if phase == "decode" else None,
        "dtod_definition": DTOD_DEFINITION["cuda" if device.type == "cuda" else "cpu"],
        "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        **summary,
        "forward_ms": round(forward_ms, 4),
        "forward_ms_runs": [round(t, 4) for t in times],
        "copy_share": (summary["dtod_time_us_total"] / 1e3) / forward_ms if forward_ms else 0.0,
        "copy_kernel_share": (summary["copy_kernel_time_us_total"] / 1e3) / forward_ms
        if forward_ms
        else 0.0,
        "time_source": "cuda device time (us)" if device.type == "cuda" else "cpu op time (us)",
        "dtypes_source": "FunctionEvent.input_dtypes"
        if dtypes_in_events
        else ("kineto dtypes()" if lookup else "op names (no dtypes)"),
        "torch_version": torch.__version__,
    }
    warning = None
    if not summary["layers_found"]:
        # e.g. a CUDA graph replay: the layers' record_function ranges do not run again.
        warning = "no slipstream::layer_* range was recorded; nothing could be attributed"
    elif device.type == "cuda" and not summary["device_events_in_layers"]:
        # The layer ranges were seen but no device event was linked to an op inside them:
        # the profiler's kernel<->op linking failed, so the zeros above would mean nothing.
        warning = "no device events were linked to CPU ops inside the layers"
    result["attribution_ok"] = warning is None
    if warning is not None:
        result["warning"] = warning
        logger.warning("profile-copies: %s", warning)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def format_table(res: dict[str, Any]) -> str:
    unit = "device copies" if res["device"] == "cuda" else "aten::copy_ calls (same dtype)"
    lines = [
        f"copy profile: {res['model']}",
        f"  device {res['device']} ({res['device_name']}), dtype {res['dtype']}, backend "
        f"{res['backend']}, phase {res['phase']}, {res['tokens']} tokens in {res['batch']} "
        f"sequence(s)",
        f"  copies = {unit}; copy kernels include dtype casts and cat",
        "",
        f"{'layer':>6} {'copies':>7} {'bytes':>12} {'time us':>10} {'attn-out':>9} "
        f"{'copy krn':>9} {'krn us':>9}",
    ]
    for i in range(len(res["dtod_events_per_layer"])):
        lines.append(
            f"{i:>6} {res['dtod_events_per_layer'][i]:>7} {res['dtod_bytes_per_layer'][i]:>12} "
            f"{res['dtod_time_us_per_layer'][i]:>10.1f} "
            f"{res['attn_output_copies_per_layer'][i]:>9} "
            f"{res['copy_kernels_per_layer'][i]:>9} "
            f"{res['copy_kernel_time_us_per_layer'][i]:>9.1f}"
        )
    lines.append(
        f"{'other':>6} {res['dtod_events_outside_layers']:>7} "
        f"{res['dtod_bytes_outside_layers']:>12} {res['dtod_time_us_outside_layers']:>10.1f} "
        f"{'':>9} {res['copy_kernels_outside_layers']:>9}"
    )
    lines.append(
        f"{'total':>6} {res['dtod_events_total']:>7} {res['dtod_bytes_total']:>12} "
        f"{res['dtod_time_us_total']:>10.1f} {res['attn_output_copies_total']:>9} "
        f"{res['copy_kernels_total']:>9} {res['copy_kernel_time_us_total']:>9.1f}"
    )
    lines.append("")
    lines.append(
        f"forward {res['forward_ms']:.3f} ms (median of {len(res['forward_ms_runs'])}, outside "
        f"the profiler); copies {100 * res['copy_share']:.2f}% of it, copy kernels "
        f"{100 * res['copy_kernel_share']:.2f}%"
    )
    emu = sum(res.get("dtod_events_emulation_per_layer", []))
    if emu:
        lines.append(
            f"{emu} of the layers' copies are the Triton interpreter's storage write-backs "
            "(CPU emulation of the kernels); without them: "
            f"{res['dtod_events_model_per_layer']} per layer"
        )
    if res.get("dtod_events_unlinked"):
        lines.append(f"{res['dtod_events_unlinked']} memcpy DtoD linked to no op (in the total)")
    if not res.get("attribution_ok", True):
        lines.append(f"WARNING: {res.get('warning')}; the counts above are not valid")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--tokens", type=int, default=7168, help="tokens in the forward")
    p.add_argument("--batch", type=int, default=1, help="split the tokens into B sequences")
    p.add_argument("--backend", default=None, help="attention backend: flash or torch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quantization", default=None, choices=["fp8"], help="fp8 (CUDA only)")
    p.add_argument("--phase", default="embed", choices=["embed", "decode"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards (median)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    p.add_argument("--trace", default=None, metavar="FILE", help="export a chrome trace")


def use_triton_interpreter_on_cpu(device: str | None) -> None:
    """Triton kernels run on CPU only under the interpreter, which must be chosen before the
    first kernel is built: default TRITON_INTERPRET=1 when the run is on CPU."""
    import os

    on_cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
    if on_cpu and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


def run(args: argparse.Namespace) -> int:
    from slipstream import Engine

    use_triton_interpreter_on_cpu(args.device)
    batch, tokens = int(args.batch), int(args.tokens)
    engine = Engine(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.backend,
        max_batch_tokens=max(tokens, 16384),
        max_input_tokens=None,
        quantization=args.quantization,
    )
    res = profile_copies(
        engine,
        tokens,
        batch,
        phase=args.phase,
        seed=args.seed,
        timing_runs=args.repeats,
        trace_path=args.trace,
    )
    res["command"] = _command(args)
    print(format_table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["slipstream", "profile-copies"]
    for key in (
        "model",
        "tokens",
        "batch",
        "backend",
        "device",
        "dtype",
        "quantization",
        "phase",
        "seed",
        "repeats",
        "json",
        "trace",
    ):
        val = getattr(args, key, None)
        if val is not None:
            parts += [f"--{key}", str(val)]
    return " ".join(parts)
