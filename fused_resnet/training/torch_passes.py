"""The training passes as PyTorch ops: any device, any dtype, any layout (the reference the kernels are held to)."""

from __future__ import annotations

import torch

from .stats import batch_stats

__all__ = ["batch_stats", "grad_input", "grad_sums", "normalize"]


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _pre_activation(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    # In the accumulation dtype; forward's output and backward's mask both come from here, bit-identical.
    z = torch.addcmul(_channel(shift), y, _channel(scale))
    if residual is None:
        return z
    return z + residual if residual_scale is None else torch.addcmul(z, residual, _channel(residual_scale))


def normalize(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    z = _pre_activation(y, scale, shift, residual, residual_scale)
    return (torch.relu(z) if relu else z).to(y.dtype)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if relu:
        g = torch.where(_pre_activation(y, scale, shift, residual, residual_scale) > 0, g, 0)
    acc, dims = mean.dtype, (0, 2, 3)
    sum_g = g.sum(dims, dtype=acc)
    sum_gy = (g.to(acc) * (y.to(acc) - _channel(mean))).sum(dims)
    return sum_g, sum_gy, g


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
    if relu:
        g = torch.where(_pre_activation(y, scale, shift, residual, residual_scale) > 0, g, 0)
    # y first: the result takes y's layout, as the conv's backward that reads it beside y prefers.
    return torch.addcmul(torch.addcmul(_channel(c), y.to(a.dtype), _channel(b)), g.to(a.dtype), _channel(a)).to(y.dtype)
