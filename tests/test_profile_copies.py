"""The copy profiler: per-layer attribution on CPU, on synthetic CUDA-style events, on GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd import DeviceType

from slipstream import Engine
from slipstream.bench.profile_copies import (
    ATTENTION_RANGE,
    DecodeProfileUnavailable,
    attribute_copies,
    profile_copies,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {
    "backend",
    "device",
    "dtype",
    "tokens",
    "batch",
    "num_layers",
    "dtod_events_total",
    "dtod_bytes_total",
    "dtod_time_us_total",
    "dtod_events_per_layer",
    "dtod_bytes_per_layer",
    "copy_kernels_total",
    "copy_kernels_per_layer",
    "copy_kernel_time_us_total",
    "forward_ms",
    "copy_share",
}


def _check_consistent(res: dict[str, Any]) -> None:
    n = res["num_layers"]
    for key in (
        "dtod_events_per_layer",
        "dtod_bytes_per_layer",
        "dtod_time_us_per_layer",
        "copy_kernels_per_layer",
        "attn_output_copies_per_layer",
    ):
        assert len(res[key]) == n, key
    assert res["dtod_events_total"] == (
        sum(res["dtod_events_per_layer"])
        + res["dtod_events_outside_layers"]
        + res["dtod_events_unlinked"]
    )
    assert (
        res["dtod_bytes_total"]
        == sum(res["dtod_bytes_per_layer"]) + res["dtod_bytes_outside_layers"]
    )
    assert res["dtod_time_us_total"] == pytest.approx(
        sum(res["dtod_time_us_per_layer"])
        + res["dtod_time_us_outside_layers"]
        + res["dtod_time_us_unlinked"],
        abs=0.01,
    )
    assert (
        res["copy_kernels_total"]
        == sum(res["copy_kernels_per_layer"]) + res["copy_kernels_outside_layers"]
    )
    assert res["forward_ms"] > 0
    assert res["copy_share"] >= 0
    assert res["attribution_ok"]


@pytest.fixture(scope="module")
def torch_engine(tiny_qwen3: Path) -> Engine:
    return Engine(tiny_qwen3, device="cpu", dtype="float32", attention_backend="torch")


def test_torch_backend_copies_once_per_sequence_per_layer(torch_engine: Engine) -> None:
    batch = 2
    res = profile_copies(torch_engine, tokens=64, batch=batch, timing_runs=1)
    assert REQUIRED_KEYS <= res.keys()
    assert res["device"] == "cpu" and res["backend"] == "torch"
    assert res["tokens"] == 64 and res["batch"] == batch
    assert res["num_layers"] == torch_engine.model_config.num_layers == 2
    _check_consistent(res)
    # The reference backend copies SDPA's result into the layer's buffer once per sequence.
    assert all(c >= batch for c in res["dtod_events_per_layer"])
    assert res["attn_output_copies_per_layer"] == [batch] * res["num_layers"]
    assert res["dtod_events_model_per_layer"] == res["dtod_events_per_layer"]
    assert res["attention_region_found"]
    cfg = torch_engine.model_config
    out_bytes = 64 * cfg.num_heads * cfg.head_dim * 4  # both sequences' rows, float32
    *full, last = res["dtod_bytes_per_layer"]
    assert all(b >= out_bytes for b in full)
    # last-token pooling: the final layer computes one attention row per sequence
    assert last == batch * cfg.num_heads * cfg.head_dim * 4


def test_cli_writes_json(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "copies.json"
    cmd = [
        sys.executable,
        "-m",
        "slipstream",
        "profile-copies",
        "--model",
        str(tiny_qwen3),
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--tokens",
        "64",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and "forward" in proc.stdout
    res = json.loads(out.read_text())
    assert REQUIRED_KEYS <= res.keys()
    assert res["command"].startswith("slipstream profile-copies")
    _check_consistent(res)
    assert all(c >= 2 for c in res["dtod_events_per_layer"])


def _flash_usable() -> str | None:
    try:
        from slipstream.kernels.flash_attn import triton_available
    except Exception as e:  # noqa: BLE001
        return f"slipstream.kernels.flash_attn does not import: {e!r}"
    if not triton_available():
        return "Triton cannot run here (no GPU and TRITON_INTERPRET unset)"
    return None


def test_flash_backend_makes_no_attention_output_copy(tiny_qwen3: Path) -> None:
    why = _flash_usable()
    if why:
        pytest.skip(why)
    engine = Engine(tiny_qwen3, device="cpu", dtype="float32", attention_backend="flash")
    res = profile_copies(engine, tokens=64, batch=2, timing_runs=1)
    _check_consistent(res)
    print(
        "flash on CPU (Triton interpreter): same-dtype copies per layer",
        res["dtod_events_per_layer"],
        "of which the interpreter's storage write-backs",
        res["dtod_events_emulation_per_layer"],
        "attention-output copies",
        res["attn_output_copies_per_layer"],
    )
    assert res["attention_region_found"]
    assert res["attn_output_copies_per_layer"] == [0] * res["num_layers"]
    # Every same-dtype copy left in a layer is the interpreter copying argument storages back
    # after the launch; the model code around the kernel copies nothing.
    assert res["dtod_events_model_per_layer"] == [0] * res["num_layers"]


def test_decode_phase(torch_engine: Engine) -> None:
    """One decode step through the generation engine's hook, or a clear error without it."""
    import importlib

    try:
        generation = importlib.import_module("slipstream.engine.generation")
    except ModuleNotFoundError:
        generation = None
    if generation is None or not hasattr(generation, "run_decode_step_for_profile"):
        with pytest.raises(DecodeProfileUnavailable, match="run_decode_step_for_profile"):
            profile_copies(torch_engine, tokens=64, batch=2, phase="decode", timing_runs=1)
        return
    res = profile_copies(torch_engine, tokens=64, batch=2, phase="decode", timing_runs=1)
    _check_consistent(res)
    assert res["phase"] == "decode" and res["context_len"] == 32
    assert res["layers_found"] == res["num_layers"]
    print(
        "decode, torch backend, CPU:",
        res["dtod_events_per_layer"],
        res["attn_output_copies_per_layer"],
    )


# --------------------------------------------------------------------------------------
# Synthetic CUDA-style profiles: the attribution path that only a GPU exercises for real.
# --------------------------------------------------------------------------------------


@dataclass
class _Range:
    start: float
    end: float


@dataclass
class _Kernel:
    name: str
    device: int
    duration: float


@dataclass(eq=False)
class _Evt:
    name: str
    start: float
    end: float
    input_shapes: list[Any] = field(default_factory=list)
    input_dtypes: list[str] | None = None
    kernels: list[_Kernel] = field(default_factory=list)
    is_user_annotation: bool = False
    id: int = 0
    device_type: DeviceType = DeviceType.CPU
    is_async: bool = False
    cpu_parent: _Evt | None = None
    cpu_children: list[_Evt] = field(default_factory=list)

    @property
    def time_range(self) -> _Range:
        return _Range(self.start, self.end)

    def add(self, *children: _Evt) -> _Evt:
        for c in children:
            c.cpu_parent = self
            self.cpu_children.append(c)
        return self


def _flatten(root: _Evt) -> list[_Evt]:
    out, stack = [], [root]
    while stack:
        e = stack.pop()
        out.append(e)
        stack.extend(e.cpu_children)
    return out


COPY_KERNEL = (
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
    "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}"
)


def _cuda_layer(i: int, t0: float, with_dtypes: bool) -> _Evt:
    """One layer as the CUDA profiler shows it: a cast, a cat, a GEMM, and in attention a
    strided same-dtype copy (torch backend) and a contiguous one (memcpy DtoD)."""
    bf, f32 = "c10::BFloat16", "float"

    def dts(*d: str) -> list[str] | None:
        return list(d) if with_dtypes else None

    layer = _Evt(
        f"slipstream::layer_{i}",
        t0,
        t0 + 100,
        is_user_annotation=True,
        kernels=[_Kernel(f"slipstream::layer_{i}", 0, 99.0)],
    )
    cast = _Evt("aten::to", t0 + 1, t0 + 9).add(
        _Evt("aten::_to_copy", t0 + 2, t0 + 8).add(
            _Evt(
                "aten::copy_",
                t0 + 3,
                t0 + 7,
                [[64, 64], [64, 64], []],
                dts(f32, bf, "Scalar"),
                [_Kernel(COPY_KERNEL, 0, 2.0)],
                id=10 * i + 1,
            )
        )
    )
    cat = _Evt(
        "aten::cat",
        t0 + 10,
        t0 + 14,
        [[], []],
        dts("TensorList", "Scalar"),
        [_Kernel("void at::native::CatArrayBatchedCopy<...>", 0, 1.5)],
    )
    gemm = _Evt("aten::linear", t0 + 15, t0 + 30).add(
        _Evt("aten::mm", t0 + 16, t0 + 29, kernels=[_Kernel("sm90_xmma_gemm_bf16", 0, 20.0)])
    )
    attn = _Evt(ATTENTION_RANGE, t0 + 31, t0 + 60, is_user_annotation=True).add(
        _Evt(
            "aten::copy_",
            t0 + 32,
            t0 + 40,
            [[32, 4, 16], [32, 4, 16], []],
            dts(bf, bf, "Scalar"),
            [_Kernel(COPY_KERNEL, 0, 3.0)],
            id=10 * i + 2,
        ),
        _Evt(
            "aten::copy_",
            t0 + 41,
            t0 + 50,
            [[32, 64], [32, 64], []],
            dts(bf, bf, "Scalar"),
            [_Kernel("Memcpy DtoD (Device -> Device)", 0, 4.0)],
            id=10 * i + 3,
        ).add(_Evt("cudaMemcpyAsync", t0 + 42, t0 + 49)),
        _Evt(
            "aten::copy_",
            t0 + 51,
            t0 + 55,
            [[3], [3], []],
            dts("long int", "int", "Scalar"),
            [_Kernel("Memcpy DtoH (Device -> Pageable)", 0, 1.0)],
            id=10 * i + 4,
        ),
    )
    return layer.add(cast, cat, gemm, attn)


@pytest.mark.parametrize("with_dtypes", [True, False])
def test_attribution_of_cuda_style_events(with_dtypes: bool) -> None:
    layers = [_cuda_layer(i, 1000.0 * i, with_dtypes) for i in range(3)]
    outside = _Evt(
        "aten::copy_",
        5000,
        5010,
        [[8, 64], [8, 64], []],
        ["float", "float", "Scalar"] if with_dtypes else None,
        [_Kernel("Memcpy DtoD (Device -> Device)", 0, 0.5)],
        id=999,
    )
    events = [e for root in [*layers, outside] for e in _flatten(root)]
    # Without input_dtypes on the events, the dtypes come from a lookup by op id (the raw
    # Kineto events); without either, a copy_ under _to_copy is taken as a conversion.
    table = {e.id: ["c10::BFloat16", "c10::BFloat16"] for e in events if e.id % 10 in (2, 3)}
    table.update({e.id: ["float", "c10::BFloat16"] for e in events if e.id % 10 == 1})
    table.update({e.id: ["long int", "int"] for e in events if e.id % 10 == 4})
    table[999] = ["float", "float"]
    lookup = None if with_dtypes else (lambda evt: table.get(evt.id))
    att = attribute_copies(
        events,
        device_kind="cuda",
        num_heads=4,
        head_dim=16,
        default_element_size=2,
        dtype_lookup=lookup,
    )
    res = summarize(att, num_layers=3)
    # per layer: the strided attention copy + the memcpy DtoD; not the cast, cat, DtoH
    assert res["dtod_events_per_layer"] == [2, 2, 2]
    assert res["memcpy_dtod_events_per_layer"] == [1, 1, 1]
    assert res["dtod_bytes_per_layer"] == [(32 * 4 * 16 + 32 * 64) * 2] * 3
    assert res["dtod_time_us_per_layer"] == [7.0, 7.0, 7.0]
    # [n, Hq, D] and [n, Hq*D] destinations inside the attention range
    assert res["attn_output_copies_per_layer"] == [2, 2, 2]
    # copy-family kernels: cast + cat + strided copy (memcpys are counted apart)
    assert res["copy_kernels_per_layer"] == [3, 3, 3]
    assert res["copy_kernel_time_us_per_layer"] == [6.5, 6.5, 6.5]
    assert res["dtod_events_outside_layers"] == 1
    assert res["dtod_bytes_outside_layers"] == 8 * 64 * 4
    assert res["dtod_events_total"] == 7
    assert res["memcpy_other_events"] == 3
    # the layer annotations' GPU-side mirrors are not device work
    assert res["device_events_in_layers"] == 3 * 6
    assert res["layers_found"] == 3 and res["attention_region_found"]


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_flash_copies_nothing_torch_copies(tmp_path: Path) -> None:
    from slipstream.checkpoint import make_checkpoint

    ckpt = make_checkpoint("qwen3-tiny", tmp_path / "tiny-bf16", seed=0, dtype="bfloat16")
    flash = Engine(ckpt, device="cuda", dtype="bfloat16", attention_backend="flash")
    res = profile_copies(flash, tokens=512, batch=2, timing_runs=3)
    print(json.dumps({k: v for k, v in res.items() if k != "copy_breakdown"}, indent=1))
    _check_consistent(res)
    assert res["device"] == "cuda"
    assert res["device_events_in_layers"] > 0  # the kernel <-> op linking worked
    assert res["dtod_events_per_layer"] == [0] * res["num_layers"]
    assert res["attn_output_copies_per_layer"] == [0] * res["num_layers"]
    del flash
    ref = Engine(ckpt, device="cuda", dtype="bfloat16", attention_backend="torch")
    res = profile_copies(ref, tokens=512, batch=2, timing_runs=3)
    print(json.dumps(res["copy_breakdown"][:8], indent=1))
    _check_consistent(res)
    assert all(c > 0 for c in res["dtod_events_per_layer"])
    assert res["attn_output_copies_per_layer"] == [2] * res["num_layers"]
    assert res["dtod_time_us_total"] > 0 and res["dtod_bytes_total"] > 0
    assert torch.cuda.is_available()


@pytest.mark.parametrize("drop_dtypes", [False, True])
def test_attribution_on_real_function_events(drop_dtypes: bool) -> None:
    """The same walk over torch's own FunctionEvent/EventList classes (tree built by torch)."""
    import inspect

    from torch.autograd.profiler_util import EventList, FunctionEvent

    if not hasattr(EventList, "_build_tree"):
        pytest.skip("this torch builds the event tree differently")
    # torch versions before input_dtypes existed take the dtypes from the raw Kineto events
    takes_dtypes = "input_dtypes" in inspect.signature(FunctionEvent.__init__).parameters
    takes_dtypes = takes_dtypes and not drop_dtypes

    def ev(i: int, name: str, start: float, end: float, **kw: Any) -> FunctionEvent:
        if not takes_dtypes:
            kw.pop("input_dtypes", None)
        return FunctionEvent(i, name, thread=1, start_us=start, end_us=end, use_device="cuda", **kw)

    bf = "c10::BFloat16"
    layer = ev(1, "slipstream::layer_0", 0, 100, is_user_annotation=True)
    attn = ev(2, ATTENTION_RANGE, 10, 60, is_user_annotation=True)
    copy = ev(
        3,
        "aten::copy_",
        20,
        30,
        input_shapes=[[32, 4, 16], [32, 4, 16], []],
        input_dtypes=[bf, bf, "Scalar"],
    )
    copy.append_kernel("Memcpy DtoD (Device -> Device)", 0, 3.0)
    launch = ev(4, "cudaMemcpyAsync", 21, 29)
    gemm = ev(5, "aten::mm", 70, 90, input_shapes=[[64, 64], [64, 64]])
    gemm.append_kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 12.0)
    # torch also lists the device-side events themselves; they must not be counted twice
    dev = ev(6, "Memcpy DtoD (Device -> Device)", 25, 28, device_type=DeviceType.CUDA)
    gpu_range = ev(7, "slipstream::layer_0", 1, 99, device_type=DeviceType.CUDA)
    events = EventList([layer, attn, copy, launch, gemm, dev, gpu_range], use_device="cuda")
    events._build_tree()
    assert copy.cpu_parent is attn and attn.cpu_parent is layer
    table = {3: [bf, bf, "Scalar"]}
    att = attribute_copies(
        events,
        device_kind="cuda",
        num_heads=4,
        head_dim=16,
        default_element_size=2,
        dtype_lookup=None if takes_dtypes else (lambda e: table.get(e.id)),
    )
    res = summarize(att, num_layers=1)
    assert res["dtod_events_per_layer"] == [1]
    assert res["dtod_bytes_per_layer"] == [32 * 4 * 16 * 2]
    assert res["attn_output_copies_per_layer"] == [1]
    assert res["device_events_in_layers"] == 2
    assert res["dtod_time_us_total"] == 3.0
    assert res["device_events_listed"] == 1 and res["dtod_events_unlinked"] == 0
    # a memcpy DtoD that no op claims still shows in the totals
    stray = ev(8, "Memcpy DtoD (Device -> Device)", 95, 97, device_type=DeviceType.CUDA)
    res = summarize(
        attribute_copies(
            [*events, stray],
            device_kind="cuda",
            num_heads=4,
            head_dim=16,
            default_element_size=2,
            dtype_lookup=None if takes_dtypes else (lambda e: table.get(e.id)),
        ),
        num_layers=1,
    )
    assert res["dtod_events_per_layer"] == [1]
    assert res["dtod_events_unlinked"] == 1 and res["dtod_events_total"] == 2
