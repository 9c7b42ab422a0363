"""Build a model on the meta device and fill it from safetensors, checking every key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from slipstream.errors import ModelLoadError


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


def load_weights(model: nn.Module, model_dir: Path, device: torch.device) -> None:
    """Copy every checkpoint tensor into its parameter (casting to the parameter's dtype).

    Fails naming the key on an unexpected tensor, a shape mismatch, or a parameter (or
    merged partition) that the checkpoint did not provide.
    """
    mapper: LoadableModel = model  # type: ignore[assignment]
    params = dict(model.named_parameters())
    # parameter -> partitions still to fill (None = the whole tensor)
    pending: dict[str, set[str | None]] = {}
    for pname in params:
        owner = model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model
        parts = getattr(owner, "partitions", None)
        pending[pname] = set(parts) if parts else {None}

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
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
