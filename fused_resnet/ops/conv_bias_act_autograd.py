"""Fake (meta) and autograd registrations shared by every backend's conv_bias_act op.

Every backend exposes the same schema under its own namespace (see SCHEMA):
returning act(conv(pre(x), weight) + bias + residual) in x's dtype, channels_last, with
pre(x) = relu(x·in_scale + in_shift) when in_scale is given (ops/reference.py defines it exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .conv_config import ConvConfig

SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? in_scale, Tensor? in_shift, "
    "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor"
)


def fake_conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    config = ConvConfig(tuple(stride), tuple(padding), tuple(dilation), groups)
    shape = config.output_shape(x, weight)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, groups, relu = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, weight, output if relu else None, in_scale, in_shift)


def _sum_nhw(t: torch.Tensor) -> torch.Tensor:
    # Reductions over a whole batch accumulate in fp32 at least (fp64 stays fp64).
    return t.sum(dim=(0, 2, 3), dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


# y = act(conv(a, w) + b + r), a = pre(x) = relu(x·s + t) or x, act = relu or identity:
#   g' = g · 1[y > 0]           (relu; torch.relu's own backward masks on its result the same way)
#   dL/dr = g',  dL/db = Σ_{n,h,w} g',  (dL/da, dL/dw) = convolution_backward(g', a, w)
#   with a prologue, m = 1[a > 0]: dL/dx = dL/da·m·s,  dL/ds = Σ dL/da·m·x,  dL/dt = Σ dL/da·m
def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, y, in_scale, in_shift = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (y > 0).to(grad.dtype)
    need_x, need_w, need_b, need_r, need_s, need_t = ctx.needs_input_grad[:6]
    prologue = in_scale is not None
    a = x
    if prologue:
        a = torch.relu(x * in_scale.to(x.dtype).view(1, -1, 1, 1) + in_shift.to(x.dtype).view(1, -1, 1, 1))
    need_a = need_x or (prologue and (need_s or need_t))
    grad_x = grad_w = grad_s = grad_t = None
    if need_a or need_w:
        stride, padding, dilation, groups = ctx.conv
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_a, need_w, False]
        )
        if need_a and prologue:
            grad_a = grad_a * (a > 0).to(grad_a.dtype)
            grad_x = grad_a * in_scale.to(grad_a.dtype).view(1, -1, 1, 1) if need_x else None
            grad_s = _sum_nhw(grad_a * x).to(in_scale.dtype) if need_s else None
            grad_t = _sum_nhw(grad_a).to(in_shift.dtype) if need_t else None
        elif need_x:
            grad_x = grad_a
    grad_b = _sum_nhw(grad).to(ctx.bias_dtype) if need_b else None
    grad_r = grad if (need_r and ctx.has_residual) else None
    return grad_x, grad_w, grad_b, grad_r, grad_s, grad_t, None, None, None, None, None


def register_fake_and_autograd(op: Any) -> None:
    """Registers the shared fake implementation and backward formula on a conv_bias_act op."""
    torch.library.register_fake(op, fake_conv_bias_act)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


def call_with_config(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapts an op with SCHEMA to the Backend.conv_bias_act signature (config object, prologue last)."""

    def conv_bias_act(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor | None,
        config: ConvConfig,
        relu: bool,
        in_scale: torch.Tensor | None = None,
        in_shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stride, padding, dilation = list(config.stride), list(config.padding), list(config.dilation)
        return op(x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, config.groups, relu)

    return conv_bias_act
