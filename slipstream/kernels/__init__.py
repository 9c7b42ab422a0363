"""Custom kernels for slipstream.

Importing this package never requires Triton: the kernels are jit-compiled on first use, and
``torch.ops.slipstream.flash_attn_varlen`` is registered either way (it raises a clear error
when called without Triton).
"""

from __future__ import annotations

from slipstream.kernels.flash_attn import SUPPORTED_HEAD_DIMS, flash_attn_varlen, triton_available

__all__ = ["SUPPORTED_HEAD_DIMS", "flash_attn_varlen", "triton_available"]
