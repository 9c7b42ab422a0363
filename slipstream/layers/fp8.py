"""FP8 (float8_e4m3fn) linear layers: per-output-channel weight scales, per-token activations.

``y = (q_x * s_x) @ (q_w * s_w)^T + b`` with

* ``q_w``: [N, K] float8_e4m3fn, ``s_w``: [N] float32 = rowmax|W| / 448 (one scale per output
  channel, so merged qkv / gate_up partitions simply concatenate their rows and scales);
* ``q_x``: [T, K] float8_e4m3fn, ``s_x``: [T, 1] float32 = rowmax|x| / 448, computed on the fly
  per token (dynamic; a Triton kernel on CUDA). Per-token scaling keeps embeddings
  batch-invariant: a token's quantisation never depends on the other tokens in the batch.

On Hopper the GEMM is ``torch._scaled_mm`` with row-wise scales (cuBLASLt / CUTLASS); its
requirements, checked here before the first call: mat1 row-major [T, K], mat2 column-major
[K, N] (``w.t()`` of the row-major [N, K] weight), K and N multiples of 16, scale_a [T, 1] and
scale_b [1, N] contiguous float32, out_dtype bfloat16 (the one output dtype every torch version's
row-wise path accepts) and a bfloat16 bias. T needs no padding. Elsewhere (CPU, tests, GPUs
without fp8 tensor cores) the reference path dequantises and multiplies in float32: the same
quantisation, so it shows the same numerics up to accumulation order.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import nn

from slipstream.errors import ConfigError
from slipstream.kernels import fused as fused_ops
from slipstream.layers.linear import Linear, PartitionedOutput

logger = logging.getLogger("slipstream")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = fused_ops.FP8_MAX  # 448.0
_MIN_AMAX = fused_ops.FP8_MIN_AMAX


class Fp8Rows(NamedTuple):
    """Activations already quantised per token for an :class:`Fp8Linear` (``x ~= q * scale``),
    produced by the fused RMSNorm / SiLU-and-mul kernels so that no separate quantisation
    pass reads the bf16 tensor again."""

    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] float32
    dtype: torch.dtype  # dtype of the unquantised activations (the layer's output dtype)


def quantize_weight_per_channel(
    w: torch.Tensor,  # [N, K] any float dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, K] float8_e4m3fn, [N] float32)
    """Symmetric per-output-channel quantisation: ``w ~= q * scale[:, None]``."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {tuple(w.shape)}")
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=_MIN_AMAX) / FP8_MAX
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(
    q: torch.Tensor,  # [N, K] float8
    scale: torch.Tensor,  # [N] float32
) -> torch.Tensor:  # [N, K] float32
    return q.float() * scale.float()[:, None]


def quantize_per_token(
    x: torch.Tensor,  # [T, K]
    fused: str = "off",
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, K] float8_e4m3fn, [T, 1] float32)
    """Dynamic per-token quantisation (Triton kernel on CUDA where fusion applies, else torch).

    Never the interpreter: its fp32 -> fp8 conversion mis-rounds (see tests/test_kernels_fused).
    """
    if x.is_cuda and fused_ops.should_fuse(fused, x):
        return fused_ops.fp8_quant_per_token(x)
    return fused_ops.fp8_quant_per_token_ref(x)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales can run on ``device`` (Hopper)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    # Row-wise scaling is an sm90 kernel (cuBLAS >= 12.9 or torch's CUTLASS kernel); sm89
    # has fp8 tensor cores but not this path in every torch build, so it is not assumed.
    return major == 9


class Fp8Linear(PartitionedOutput, nn.Module):
    """A :class:`Linear` with float8 weights; same partitions / loader interface."""

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        partitions: list[str] | None = None,
        use_scaled_mm: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self._init_partitions(out_features, partitions)
        self.in_features = in_features
        n, k = self.out_features, in_features
        # Parameters (not buffers) so that the checkpoint loader fills them by name, partition
        # by partition; never trained. weight_scale is [N] so a partition is a plain slice.
        self.weight = nn.Parameter(
            torch.empty(n, k, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(n, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(n, dtype=bias_dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.fused = fused_ops.fusion_mode()
        self.use_scaled_mm = False
        self.set_gemm(use_scaled_mm)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: Linear, use_scaled_mm: bool | None = None) -> Fp8Linear:
        """Quantise a loaded :class:`Linear` (its weight is not kept)."""
        w = linear.weight.detach()
        sizes = [s for _, s in linear.partitions.values()] or [linear.out_features]
        names = list(linear.partitions) or None
        dev = w.device
        bias = linear.bias
        mod = cls(
            linear.in_features,
            sizes,
            bias=bias is not None,
            partitions=names,
            use_scaled_mm=False,
            device=dev,
            bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
        )
        with torch.no_grad():
            q, s = quantize_weight_per_channel(w)
            mod.weight.copy_(q)
            mod.weight_scale.copy_(s)
            if bias is not None:
                mod.bias.copy_(bias.detach())  # type: ignore[union-attr]
        mod.set_gemm(use_scaled_mm)
        return mod

    @classmethod
    def empty_like_linear(cls, linear: Linear, use_scaled_mm: bool | None = None) -> Fp8Linear:
        """An unfilled Fp8Linear with ``linear``'s shape, partitions, device (for the loader)."""
        sizes = [s for _, s in linear.partitions.values()] or [linear.out_features]
        bias = linear.bias
        mod = cls(
            linear.in_features,
            sizes,
            bias=bias is not None,
            partitions=list(linear.partitions) or None,
            use_scaled_mm=False,
            device=linear.weight.device,
            bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
        )
        mod.set_gemm(use_scaled_mm)
        return mod

    def set_gemm(self, use_scaled_mm: bool | None) -> None:
        """Choose the GEMM: True = torch._scaled_mm (raises if it cannot run), False =
        dequantise-and-matmul reference, None = _scaled_mm where supported."""
        dev = self.weight.device
        shapes_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
        if use_scaled_mm is None:
            use_scaled_mm = scaled_mm_supported(dev) and shapes_ok
            if dev.type == "cuda" and not use_scaled_mm:
                logger.warning(
                    "slipstream fp8: torch._scaled_mm is not usable for a [%d, %d] weight on %s "
                    "(needs Hopper and dims divisible by 16); using the slow dequantising path",
                    self.out_features, self.in_features, dev,
                )  # fmt: skip
        elif use_scaled_mm:
            if not scaled_mm_supported(dev):
                raise ConfigError(
                    f"fp8 GEMM through torch._scaled_mm needs a CUDA device of compute "
                    f"capability 9.x (Hopper); the weight is on {dev}"
                )
            if not shapes_ok:
                raise ConfigError(
                    f"torch._scaled_mm needs in/out features divisible by 16, got "
                    f"in={self.in_features} out={self.out_features}"
                )
        self.use_scaled_mm = bool(use_scaled_mm)
        # Hopper's fp8 tensor cores accumulate in reduced precision unless asked otherwise;
        # fast accumulation roughly doubles GEMM speed. SLIPSTREAM_FP8_FAST_ACCUM=0 turns it
        # off for A/B accuracy runs.
        self.fast_accum = os.environ.get("SLIPSTREAM_FP8_FAST_ACCUM", "1") != "0"
        # Whether the layer before should hand over Fp8Rows (fused norm/activation + quant):
        # only for the _scaled_mm GEMM with fusion on (the reference path quantises itself).
        self.takes_fp8_rows = self.use_scaled_mm and self.fused != "off"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gemm={'scaled_mm' if self.use_scaled_mm else 'ref'}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:  # [..., K] -> [..., N]
        if isinstance(x, Fp8Rows):
            qx, sx, dtype = x
            if qx.dim() != 2 or qx.shape[1] != self.in_features:
                raise ValueError(
                    f"Fp8Linear: quantised input has shape {tuple(qx.shape)}, expected "
                    f"[tokens, {self.in_features}]"
                )
            if qx.shape[0] == 0:
                return torch.empty(0, self.out_features, dtype=dtype, device=qx.device)
            return self._gemm(qx, sx, dtype)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Fp8Linear: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        qx, sx = quantize_per_token(x2, self.fused)
        return self._gemm(qx, sx, x.dtype).view(*lead, self.out_features)

    def _gemm(self, qx: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[T, K] fp8 rows with [T, 1] scales -> [T, N] in ``dtype``."""
        if not self.use_scaled_mm:
            # Reference: exact products of fp8 values, fp32 sums, then both scales.
            acc = qx.float() @ self.weight.float().t()
            y = acc * sx * self.weight_scale[None, :]
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(dtype)
        bias = self.bias
        fuse_bias = bias is not None and bias.dtype == torch.bfloat16
        y = torch._scaled_mm(
            qx,  # [T, K] row-major
            self.weight.t(),  # [K, N] column-major view of the row-major [N, K] weight
            scale_a=sx,  # [T, 1] contiguous
            scale_b=self.weight_scale.view(1, -1),  # [1, N] contiguous
            bias=bias if fuse_bias else None,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
        if bias is not None and not fuse_bias:
            y = y + bias.to(y.dtype)
        return y if dtype == torch.bfloat16 else y.to(dtype)


def quantize_model_fp8(
    model: nn.Module, use_scaled_mm: bool | None = None, skip_layers: int = 0
) -> list[str]:
    """Replace every :class:`Linear` inside ``model.layers`` (not embeddings, not lm_head) by
    an :class:`Fp8Linear`, one at a time so that peak memory stays at the loaded model's.
    The first ``skip_layers`` decoder layers keep their :class:`Linear` modules.

    ``use_scaled_mm``: None = torch._scaled_mm where supported (Hopper, dims % 16 == 0), else
    the dequantising reference; True = require _scaled_mm (ConfigError otherwise); False = the
    reference path (CPU tests). Modules that are already Fp8Linear (loaded from an fp8
    checkpoint) keep their weights and get the same GEMM choice. Returns the names replaced.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"quantize_model_fp8: {type(model).__name__} has no `layers` ModuleList of decoder "
            "layers"
        )
    if skip_layers < 0:
        raise ValueError(f"skip_layers must be >= 0, got {skip_layers}")
    replaced: list[str] = []
    on_cuda = False
    with torch.no_grad():
        for i, layer in enumerate(layers):
            names = [n for n, m in layer.named_modules() if isinstance(m, (Linear, Fp8Linear))]
            for name in names:
                mod = layer.get_submodule(name)
                if isinstance(mod, Fp8Linear):
                    mod.set_gemm(use_scaled_mm)
                    continue
                if i < skip_layers:
                    continue
                assert isinstance(mod, Linear)
                on_cuda = on_cuda or mod.weight.is_cuda
                parent_name, _, attr = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                # Replacing the module drops the last reference to its bf16 weight.
                setattr(parent, attr, Fp8Linear.from_linear(mod, use_scaled_mm))
                replaced.append(f"layers.{i}.{name}")
    if on_cuda:
        torch.cuda.empty_cache()  # hand the freed bf16 weights back
    return replaced
