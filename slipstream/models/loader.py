"""Build a model on the meta device and fill it from safetensors, checking every key."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from slipstream.errors import ModelLoadError

logger = logging.getLogger("slipstream")

# Pre-quantized fp8 checkpoints: `<linear>.weight` in float8_e4m3fn plus `<linear>.weight_scale`
# (per output channel [N] / [N, 1], or one per-tensor scalar). Static activation scales are
# ignored: activations are always quantized per token on the fly.
_FP8_WEIGHT_SCALE = ".weight_scale"
_FP8_IGNORED_SUFFIXES = (".input_scale",)
_FP8_UNSUPPORTED_SUFFIXES = (".weight_scale_inv",)  # block-wise (128x128) scales


class LoadableModel(Protocol):
    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None: ...


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = sorted({model_dir / v for v in weight_map.values()})
        for p in files:
            if not p.is_file():
                raise ModelLoadError(f"shard {p} listed in {index} is missing")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise ModelLoadError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir} "
        "(only safetensors checkpoints are supported)"
    )


def _scale_of_ignored_weight(mapper: LoadableModel, key: str) -> bool:
    """A ``*.weight_scale`` whose weight the model ignores (e.g. an fp8 lm_head on the
    embedding path) is ignored with it."""
    return key.endswith(_FP8_WEIGHT_SCALE) and (
        mapper.map_checkpoint_name(key[: -len("_scale")]) is None
    )


def _prepare_fp8_modules(model: nn.Module, files: list[Path]) -> int:
    """Swap each Linear whose checkpoint carries a ``weight_scale`` for an empty Fp8Linear, so
    that the float8 weights and their scales load straight into it (never through bf16).
    Returns the number of modules swapped."""
    mapper: LoadableModel = model  # type: ignore[assignment]
    modules: dict[str, str] = {}  # module path -> an example key (for messages)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith(_FP8_UNSUPPORTED_SUFFIXES):
                    raise ModelLoadError(
                        f"checkpoint key {key!r} in {path.name}: block-wise fp8 scales "
                        "(weight_scale_inv) are not supported; only per-tensor or per-channel "
                        "`weight_scale`"
                    )
                if not key.endswith(_FP8_WEIGHT_SCALE) or _scale_of_ignored_weight(mapper, key):
                    continue
                mapped = mapper.map_checkpoint_name(key)
                if mapped is None:
                    continue
                modules.setdefault(mapped[0].rsplit(".", 1)[0], key)
    if not modules:
        return 0
    from slipstream.layers.fp8 import Fp8Linear
    from slipstream.layers.linear import Linear

    for mod_path, key in modules.items():
        try:
            owner = model.get_submodule(mod_path)
        except AttributeError:
            raise ModelLoadError(
                f"unexpected key {key!r}: no module {mod_path!r} in {type(model).__name__}"
            ) from None
        if isinstance(owner, Fp8Linear):
            continue
        if not isinstance(owner, Linear):
            raise ModelLoadError(
                f"checkpoint key {key!r} gives an fp8 scale to {mod_path!r}, a "
                f"{type(owner).__name__}; only linear layers can hold fp8 weights"
            )
        parent_name, _, attr = mod_path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.empty_like_linear(owner, use_scaled_mm=None))
    logger.info(
        "fp8 checkpoint: %d linear layers load as float8 weights with per-channel scales "
        "(activations are quantized per token at run time)", len(modules),
    )  # fmt: skip
    return len(modules)


def _fp8_scale_rows(key: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint weight_scale -> [rows] float32: per-channel [rows] / [rows, 1] as is, a
    per-tensor scalar expanded (so merged partitions each keep their own scale)."""
    if not tensor.is_floating_point():
        raise ModelLoadError(f"checkpoint key {key!r} has dtype {tensor.dtype}, not a float scale")
    t = tensor.float()
    if t.numel() == 1:
        return t.reshape(1).expand(rows)
    if tuple(t.shape) in ((rows,), (rows, 1)):
        return t.reshape(rows)
    raise ModelLoadError(
        f"checkpoint key {key!r} has shape {tuple(t.shape)}: expected a per-tensor scale or "
        f"a per-output-channel one of ({rows},) or ({rows}, 1) (block-wise scales are not "
        "supported)"
    )


def load_weights(model: nn.Module, model_dir: Path, device: torch.device) -> None:
    """Copy every checkpoint tensor into its parameter (casting to the parameter's dtype).

    Fails naming the key on an unexpected tensor, a shape mismatch, or a parameter (or
    merged partition) that the checkpoint did not provide. Linear layers stored in fp8
    (float8_e4m3fn weight + ``weight_scale``) are loaded as ``Fp8Linear`` without a detour
    through the model dtype; a float8 tensor is never silently cast.
    """
    mapper: LoadableModel = model  # type: ignore[assignment]
    files = checkpoint_files(model_dir)
    _prepare_fp8_modules(model, files)
    params = dict(model.named_parameters())
    # parameter -> partitions still to fill (None = the whole tensor)
    pending: dict[str, set[str | None]] = {}
    for pname in params:
        owner = model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model
        parts = getattr(owner, "partitions", None)
        pending[pname] = set(parts) if parts else {None}

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith(_FP8_IGNORED_SUFFIXES) or _scale_of_ignored_weight(mapper, key):
                    continue
                mapped = mapper.map_checkpoint_name(key)
                if mapped is None:
                    continue
                pname, shard = mapped
                if pname not in params:
                    raise ModelLoadError(
                        f"unexpected key {key!r} in {path.name}: no parameter {pname!r} in "
                        f"{type(model).__name__}"
                    )
                if shard not in pending[pname]:
                    raise ModelLoadError(
                        f"checkpoint key {key!r} in {path.name} maps to {pname!r}"
                        + (f" partition {shard!r}" if shard else "")
                        + " which is already loaded or is not a partition of it"
                    )
                tensor = f.get_tensor(key)
                param = params[pname]
                if shard is None:
                    target = param.data
                else:
                    owner = model.get_submodule(pname.rsplit(".", 1)[0])
                    target = param.data[owner.partition_slice(shard)]  # type: ignore[operator]
                if pname.endswith(_FP8_WEIGHT_SCALE) and key.endswith(_FP8_WEIGHT_SCALE):
                    tensor = _fp8_scale_rows(key, tensor, target.shape[0])
                _check_fp8_dtypes(key, tensor, param)
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, expected "
                        f"{tuple(target.shape)} for {pname!r}"
                        + (f" partition {shard!r}" if shard else "")
                    )
                target.copy_(tensor.to(device=device, non_blocking=True))
                pending[pname].discard(shard)

    missing = [
        p + (f" (partition {s})" if s else "")
        for p, ss in pending.items()
        for s in sorted(ss, key=str)
    ]
    if missing:
        raise ModelLoadError(
            f"checkpoint in {model_dir} is missing {len(missing)} tensor(s), e.g. "
            + ", ".join(missing[:5])
        )


_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def _check_fp8_dtypes(key: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    """A float8 tensor goes only into a float8_e4m3fn parameter, and nothing else does."""
    src8, dst8 = tensor.dtype in _FLOAT8, param.dtype in _FLOAT8
    if src8 and tensor.dtype != torch.float8_e4m3fn:
        raise ModelLoadError(
            f"checkpoint key {key!r} has dtype {tensor.dtype}; only float8_e4m3fn fp8 weights "
            "are supported"
        )
    if src8 and not dst8:
        raise ModelLoadError(
            f"checkpoint key {key!r} is {tensor.dtype} but has no `weight_scale` beside it "
            "(an fp8 weight cannot be used without its scale)"
        )
    if dst8 and not src8:
        raise ModelLoadError(
            f"checkpoint key {key!r} is {tensor.dtype}, but its layer holds fp8 weights (another "
            "partition of it, or its weight_scale, is fp8); mixed-precision partitions of one "
            "layer are not supported"
        )


def build_and_load(
    build: type[nn.Module] | object,
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """``build`` is a zero-argument callable returning the model; weights are never
    initialised on the host: the module is created on the meta device then materialised."""
    with torch.device("meta"):
        model = build()  # type: ignore[operator]
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        load_weights(model, model_dir, device)
    model.eval()
    model.requires_grad_(False)
    return model
