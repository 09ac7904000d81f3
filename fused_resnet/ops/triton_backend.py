"""The Triton kernels as a Backend entry: CUDA tensors, or CPU tensors under the Triton interpreter."""

from __future__ import annotations

import torch

from ..backends import Backend
from . import triton_conv_bias_act as kernels
from .checks import cuda_capability
from .conv_bias_act_autograd import call_with_config
from .conv_config import ConvConfig


def _unavailable() -> str | None:
    if kernels.INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)"


def _unsupported(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
    prologue: bool,
) -> str | None:
    device_type = x.device.type
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels run CUDA tensors (CPU tensors under the interpreter), got a tensor on {x.device}"
    if device_type == "cpu" and not kernels.INTERPRET:
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
    dtypes = kernels.supported_dtypes(device_type)
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} is not supported on {device_type}; use one of {', '.join(map(str, dtypes))}"
    if device_type == "cuda" and not kernels.INTERPRET:
        major, minor = cuda_capability(x.device)
        if major < 8:
            return f"the Triton kernels need compute capability 8.0 or newer (bf16 MMAs, cp.async); got {major}.{minor}"
    return kernels.size_limit_reason(tuple(x.shape), tuple(weight.shape), config)


def backend(name: str = "triton") -> Backend:
    return Backend(
        name="triton",
        conv_bias_act=call_with_config(kernels.triton_conv_bias_act),
        unavailable=_unavailable,
        unsupported=_unsupported,
        # the launcher itself, its arguments in Backend order
        launch=lambda x, w, b, r, config, relu, s=None, t=None: kernels.conv_bias_act(x, w, b, r, s, t, config, relu),
    )
