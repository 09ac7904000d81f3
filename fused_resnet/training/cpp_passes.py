"""The training passes as the extension's kernels (csrc/cpu/bn_train.cpp, csrc/cuda/bn_train.cu): the passes of
the "cpu" and "cuda" backends.

The kernels read and write NHWC (channels_last) tensors. A y in another layout runs the PyTorch passes instead,
so that every output keeps y's layout (the models convert their input to channels_last once); which one runs
depends on y alone, so a tensor remade in backward (conv_bn_act_train.Recipe) comes from the same code as in
forward. Fake implementations let torch.compile trace the ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..ops import cpp_backend
from ..ops.checks import FLOAT_DTYPES
from . import torch_passes
from .stats import BatchStats, accumulation_dtype


def unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the extension's kernels cannot run on tensors of this device type and dtype (None when they can)."""
    if device_type not in ("cpu", "cuda"):
        return f"the extension's training kernels run CPU and CUDA tensors, got a {device_type} tensor"
    reason = cpp_backend.unavailable(device_type)
    if reason is not None:
        return reason
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not supported; use one of {', '.join(map(str, FLOAT_DTYPES))}"
    return None


def _nhwc(y: torch.Tensor) -> bool:
    return y.is_contiguous(memory_format=torch.channels_last)


def batch_stats(y: torch.Tensor) -> BatchStats:
    if not _nhwc(y):
        return torch_passes.batch_stats(y)
    mean, m2 = torch.ops.fused_resnet_C.bn_stats(y)
    count = torch.full_like(mean, y.numel() // y.shape[1] if y.shape[1] else 0)
    return BatchStats(count, mean, m2)


def _kernel_or_torch(op_name: str, fallback: Callable[..., torch.Tensor], y_index: int) -> Callable[..., torch.Tensor]:
    """The extension's op where y (argument y_index) is channels_last, else the PyTorch pass; same arguments."""

    def run(*args: Any) -> torch.Tensor:
        if _nhwc(args[y_index]):
            return getattr(torch.ops.fused_resnet_C, op_name)(*args)
        return fallback(*args)

    run.__doc__ = fallback.__doc__
    return run


# (y, scale, shift, residual, relu) and (g, y, scale, shift, residual, a, b, c, relu): see passes.py
normalize = _kernel_or_torch("bn_normalize", torch_passes.normalize, 0)
grad_input = _kernel_or_torch("bn_grad_input", torch_passes.grad_input, 1)


def grad_sums(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not _nhwc(y):
        return torch_passes.grad_sums(g, y, scale, shift, residual, mean, relu, store_masked)
    sum_g, sum_gy, masked = torch.ops.fused_resnet_C.bn_grad_sums(
        g, y, scale, shift, residual, mean, relu, store_masked
    )
    return sum_g, sum_gy, masked if store_masked else None


def _channels_last_like(y: torch.Tensor) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)


def _fake_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = y.new_empty(y.shape[1], dtype=accumulation_dtype(y.dtype))
    return mean, torch.empty_like(mean)


def _fake_grad_sums(g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    store_masked = args[-1]
    masked = _channels_last_like(y) if store_masked else scale.new_empty(0)
    return torch.empty_like(scale), torch.empty_like(scale), masked


if cpp_backend._C is not None:
    torch.library.register_fake("fused_resnet_C::bn_stats", _fake_stats)
    torch.library.register_fake("fused_resnet_C::bn_normalize", lambda y, *args: _channels_last_like(y))
    torch.library.register_fake("fused_resnet_C::bn_grad_sums", _fake_grad_sums)
    torch.library.register_fake("fused_resnet_C::bn_grad_input", lambda g, y, *args: _channels_last_like(y))
