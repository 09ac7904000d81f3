"""The per-channel arithmetic of a train-mode unit as one Triton kernel per direction (eager, CUDA tensors).

Between its passes over y, a unit works on vectors of C values: forward turns (mean, M2) into invstd, the
running-stat update and (scale, shift); backward turns (Σg', Σg'·(y − μ)) into the coefficients a, b, c of
dL/dy = a·g' + b·y + c. As PyTorch ops that is about 25 tiny kernels per unit (1,950 dispatched ops in a
ResNet-50 train step against stock's 727, counted on CPU), each a launch of a few µs on a GPU. Here each direction
is one launch. The formulas are stats.finalize's, conv_bn_act_train's and torch.lerp's, in the same order.

Used in eager mode on CUDA tensors of 16- and 32-bit dtypes (statistics in fp32), and under the Triton
interpreter by the triton passes (which is how CPU tests reach the kernels); torch.compile traces the PyTorch
formulas instead, which Inductor fuses itself.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import nn

from ..ops.launch_math import cdiv
from ..ops.triton_conv_bias_act import INTERPRET
from .stats import bump_versions, running_update

_BLOCK = 256


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formula (ATen's lerp in opmath), so that running stats move exactly as nn.BatchNorm2d's do.
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def _finalize_kernel(
    mean_ptr, m2_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, invstd_ptr, scale_ptr, shift_ptr,
    C, count, eps, factor,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0)
    acc: tl.constexpr = tl.float32
    # IEEE division and square root (Triton's `/` and tl.sqrt are the approximate PTX forms), as ATen's are.
    invstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(m2, count) + eps))
    if UPDATE:
        # ATen rounds the new values to the running stats' dtype before the lerp, which runs in fp32 (or fp64).
        rm = tl.load(running_mean_ptr + offs, mask=mask, other=0.0)
        rv = tl.load(running_var_ptr + offs, mask=mask, other=0.0)
        new_mean = mean.to(rm.dtype).to(acc)
        new_var = tl.div_rn(m2, count - 1).to(rv.dtype).to(acc)
        tl.store(running_mean_ptr + offs, _lerp(rm.to(acc), new_mean, factor).to(rm.dtype), mask=mask)
        tl.store(running_var_ptr + offs, _lerp(rv.to(acc), new_var, factor).to(rv.dtype), mask=mask)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs, mask=mask, other=0.0).to(acc) * invstd
    shift = -mean * scale
    if HAS_BETA:
        shift = shift + tl.load(beta_ptr + offs, mask=mask, other=0.0).to(acc)
    tl.store(invstd_ptr + offs, invstd, mask=mask)
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)


@triton.jit
def _coefficients_kernel(
    a_ptr, sum_g_ptr, sum_gy_ptr, invstd_ptr, mean_ptr, b_ptr, c_ptr, C, count, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + offs, mask=mask, other=0.0)
    k = tl.div_rn(invstd * invstd * tl.load(sum_gy_ptr + offs, mask=mask, other=0.0), count)
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    sum_g = tl.load(sum_g_ptr + offs, mask=mask, other=0.0)
    tl.store(b_ptr + offs, -a * k, mask=mask)
    tl.store(c_ptr + offs, a * (k * mean - tl.div_rn(sum_g, count)), mask=mask)


def applies(y: torch.Tensor, passes: str) -> bool:
    """Whether this unit's per-channel arithmetic runs as the kernels here (else as PyTorch ops). Not for fp64
    units: the kernels compute in fp32 (Triton passes Python floats such as eps and momentum as fp32)."""
    if torch.compiler.is_compiling() or y.dtype == torch.float64:
        return False
    if y.device.type == "cuda":
        return not INTERPRET
    return INTERPRET and passes == "triton" and y.device.type == "cpu"


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current device, which need not be t's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def finalize_scale_shift(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: int,
    bn: nn.BatchNorm2d,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(invstd, scale, shift) of merged statistics, with bn's running-stat update (stats.finalize's rule: once,
    only where nn.BatchNorm2d would update, momentum=None as a cumulative average); count > 1 checked by the
    caller. mean and m2 are contiguous vectors in the accumulation dtype."""
    update, factor = running_update(bn)
    invstd, scale, shift = (torch.empty_like(mean) for _ in range(3))
    running_mean = bn.running_mean if update else mean  # (unused without the update)
    running_var = bn.running_var if update else mean
    with _on_device(mean):
        _finalize_kernel[(cdiv(mean.numel(), _BLOCK),)](
            mean, m2, gamma, beta, running_mean, running_var, invstd, scale, shift,
            mean.numel(), float(count), float(bn.eps), float(factor),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, UPDATE=update, BLOCK=_BLOCK,
        )  # fmt: skip
    if update:
        bump_versions(running_mean, running_var)
    return invstd, scale, shift


def coefficients(
    a: torch.Tensor, sum_g: torch.Tensor, sum_gy: torch.Tensor, invstd: torch.Tensor, mean: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, c) of dL/dy = a·g' + b·y + c: k = invstd²·Σg'(y − μ)/n, b = −a·k, c = a·(k·μ − Σg'/n)."""
    b, c = torch.empty_like(a), torch.empty_like(a)
    with _on_device(a):
        _coefficients_kernel[(cdiv(a.numel(), _BLOCK),)](
            a, sum_g, sum_gy, invstd, mean, b, c, a.numel(), float(count), BLOCK=_BLOCK
        )
    return b, c
