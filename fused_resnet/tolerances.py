"""Parity tolerances, in one place. Errors are relative-norm ‖a − b‖/‖b‖ against an fp32 (or fp64) reference
computed from the same rounded inputs, plus max-abs error reported beside them.

Why these numbers:
- float32: the fused path folds BN into the weights (one extra rounding per weight) and may sum in another
  order than cuDNN/oneDNN; over a ResNet's depth this stays ~1e-6 relative. 1e-5 leaves 10× headroom.
  On GPU, fp32 convs default to TF32 (10-bit mantissa, unit roundoff 2^-11 ≈ 4.9e-4): 5e-3 over a network.
- bfloat16: unit roundoff 2^-8 ≈ 3.9e-3 per rounded activation; a network rounds at every layer and the
  errors partly cancel: a relative-norm error of a few 1e-2 at the logits is normal for stock bf16 too.
- float16: unit roundoff 2^-11 ≈ 4.9e-4; about 8× tighter than bf16.
- float64: the exact-semantics check. Every rounding is ~1e-16, so even a badly conditioned quantity stays
  far below 1e-10 while any semantic difference (a wrong BN formula, a missed residual) is orders above it.
- gradients accumulate over the whole batch and depth: twice the forward tolerance.

Conditioning: train-mode gradients of deep nets with few samples per BN channel are ill-conditioned; stock
torchvision fp32 itself is off by ~2e-2 from fp64 on ResNet-50 at 2×3×64×64 (measured). A reduced-precision
result therefore also passes when its error is within STOCK_FACTOR of stock PyTorch's own error against the
same fp64 reference — never better-than-stock demands, never much-worse-than-stock results.
"""

from __future__ import annotations

import torch

from .ops.checks import conv_allows_tf32

FORWARD_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 4e-2,
    torch.float16: 5e-3,
}
# fp32 on a GPU runs through TF32 tensor cores unless torch.backends.cudnn.allow_tf32 is False.
FORWARD_RTOL_TF32 = 5e-3
GRAD_FACTOR = 2.0
STOCK_FACTOR = 4.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def forward_rtol(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    device = torch.device(device)
    if dtype == torch.float32 and device.type == "cuda" and conv_allows_tf32():
        return FORWARD_RTOL_TF32
    return FORWARD_RTOL[dtype]


def grad_rtol(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    return GRAD_FACTOR * forward_rtol(dtype, device)


def within_tolerance(error: float, tolerance: float, stock_error: float | None = None) -> bool:
    """error ≤ tolerance, or ≤ STOCK_FACTOR × stock PyTorch's error on the same problem (see module doc)."""
    bound = tolerance if stock_error is None else max(tolerance, STOCK_FACTOR * stock_error)
    return error <= bound
