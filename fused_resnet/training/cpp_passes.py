"""The training passes as the extension's kernels (csrc/cpu/bn_train.cpp, csrc/cuda/bn_train.cu): the passes of
the "cpu" and "cuda" backends.

The kernels read and write NHWC (channels_last) tensors. A y in another layout runs the PyTorch passes instead,
so that every output keeps y's layout (the models convert their input to channels_last once); which one runs
depends on y alone, so a tensor remade in backward (conv_bn_act_train.Recipe) comes from the same code as in
forward. Fake implementations let torch.compile trace the ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import cpp_backend
from ..ops.checks import FLOAT_DTYPES
from . import torch_passes
from .stats import BatchStats, accumulation_dtype, buffer, bump_versions, running_update


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


def finalize_applies(
    y: torch.Tensor,
    bn: nn.BatchNorm2d,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    device_type: str = "cuda",
) -> bool:
    """Whether stats_finalize can take this unit: eager, a channels_last CUDA y of 16 or 32 bits, fp32 affine
    parameters and running stats on its device (else the statistics, then training/channel_math.py's kernel or the
    PyTorch formulas). For a unit training with these passes, which the caller chose because the extension runs on
    y's device. The op has a CUDA kernel only; device_type is for tests that give it another."""
    if torch.compiler.is_compiling() or y.dtype == torch.float64:
        return False
    device = y.device
    if device.type != device_type or not _nhwc(y):
        return False
    for v in (gamma, beta, buffer(bn, "running_mean"), buffer(bn, "running_var")):
        if v is not None and (v.dtype != torch.float32 or not v.is_contiguous() or v.device != device):
            return False
    return True


def stats_finalize(
    y: torch.Tensor, bn: nn.BatchNorm2d, gamma: torch.Tensor | None, beta: torch.Tensor | None, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, invstd, scale, shift) of y's batch statistics, with bn's running-stat update (stats.finalize's rule),
    in the statistics' own launches (csrc/cuda/bn_train.cu: the merge kernel finalizes); count > 1 checked by the
    caller, finalize_applies by the caller."""
    update, factor = running_update(bn)
    running_mean, running_var = (bn.running_mean, bn.running_var) if update else (None, None)
    mean, _, invstd, scale, shift = torch.ops.fused_resnet_C.bn_stats_finalize(
        y, gamma, beta, running_mean, running_var, float(count), float(bn.eps), float(factor)
    )
    if update:
        bump_versions(running_mean, running_var)
    return mean, invstd, scale, shift


def coefficients_apply(y: torch.Tensor, invstd: torch.Tensor, device_type: str = "cuda") -> bool:
    """Whether grad_sums_coefficients can take this unit's backward: eager, a channels_last CUDA y of 16 or 32 bits
    (whose forward's statistics, mean, invstd and scale, are then fp32 vectors). For a unit training with these
    passes, without synchronized statistics (their sums are all-reduced before the coefficients). The op has a
    CUDA kernel only; device_type is for tests that give it another."""
    return (
        not torch.compiler.is_compiling()
        and y.device.type == device_type
        and invstd.dtype == torch.float32
        and y.dtype != torch.float64
        and _nhwc(y)
    )


def grad_sums_coefficients(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    relu: bool,
    store_masked: bool,
    count: int,
    residual_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(Σg', Σg'·(y − μ)·σ⁻¹, g' where store_masked, b, c): grad_sums, then the coefficients of dL/dy = a·g' + b·y + c
    (a = scale; channel_math.coefficients' formulas) and dL/dγ, in the sums' own launches (csrc/cuda/bn_train.cu:
    the merge kernel goes on); count > 1 and coefficients_apply checked by the caller."""
    sum_g, grad_gamma, b, c, masked = torch.ops.fused_resnet_C.bn_grad_sums_coefficients(
        g, y, scale, shift, residual, mean, invstd, relu, store_masked, float(count), residual_scale
    )
    return sum_g, grad_gamma, masked if store_masked else None, b, c


def normalize(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    if not _nhwc(y):
        return torch_passes.normalize(y, scale, shift, residual, relu, residual_scale)
    return torch.ops.fused_resnet_C.bn_normalize(y, scale, shift, residual, relu, residual_scale)


def grad_input(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    if not _nhwc(y):
        return torch_passes.grad_input(g, y, scale, shift, residual, a, b, c, relu, residual_scale)
    return torch.ops.fused_resnet_C.bn_grad_input(g, y, scale, shift, residual, a, b, c, relu, residual_scale)


def grad_sums(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
    residual_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not _nhwc(y):
        return torch_passes.grad_sums(g, y, scale, shift, residual, mean, relu, store_masked, residual_scale)
    sum_g, sum_gy, masked = torch.ops.fused_resnet_C.bn_grad_sums(
        g, y, scale, shift, residual, mean, relu, store_masked, residual_scale
    )
    return sum_g, sum_gy, masked if store_masked else None


def _channels_last_like(y: torch.Tensor) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)


def _fake_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = y.new_empty(y.shape[1], dtype=accumulation_dtype(y.dtype))
    return mean, torch.empty_like(mean)


def _fake_stats_finalize(y: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    mean = y.new_empty(y.shape[1], dtype=accumulation_dtype(y.dtype))
    return tuple(torch.empty_like(mean) for _ in range(5))


def _fake_grad_sums(
    g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Any, mean: torch.Tensor,
    relu: bool, store_masked: bool, residual_scale: Any = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    masked = _channels_last_like(y) if store_masked else scale.new_empty(0)
    return torch.empty_like(scale), torch.empty_like(scale), masked


def _fake_grad_sums_coefficients(
    g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Any, mean: torch.Tensor,
    invstd: torch.Tensor, relu: bool, store_masked: bool, count: float, residual_scale: Any = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    sum_g, _, masked = _fake_grad_sums(g, y, scale, shift, residual, mean, relu, store_masked)
    return sum_g, *(torch.empty_like(scale) for _ in range(3)), masked


_FAKES = {
    "bn_stats": _fake_stats,
    "bn_stats_finalize": _fake_stats_finalize,
    "bn_normalize": lambda y, *args: _channels_last_like(y),
    "bn_grad_sums": _fake_grad_sums,
    "bn_grad_sums_coefficients": _fake_grad_sums_coefficients,
    "bn_grad_input": lambda g, y, *args: _channels_last_like(y),
}
if cpp_backend.ops_built(_FAKES):
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"fused_resnet_C::{_name}", _fake)
