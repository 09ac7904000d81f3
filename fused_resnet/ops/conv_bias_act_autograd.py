"""Fake (meta) and autograd registrations shared by every backend's conv_bias_act op.

Every backend exposes the same schema under its own namespace:
    conv_bias_act(Tensor x, Tensor weight, Tensor bias, Tensor? residual,
                  int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor
returning act(conv(x, weight) + bias + residual) in x's dtype, in channels_last memory format.
"""

from __future__ import annotations

from typing import Any

import torch

from .conv_config import ConvConfig


def fake_conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
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
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, weight, output if relu else None)


# y = act(conv(x, w) + b + r), act = relu or identity:
#   g' = g · 1[y > 0]    (for relu; torch.relu's own backward uses the same mask on its result)
#   dL/dr = g',  dL/db = Σ_{n,h,w} g',  (dL/dx, dL/dw) = convolution_backward(g', x, w)
def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, y = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (y > 0).to(grad.dtype)
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    grad_x = grad_w = None
    if need_x or need_w:
        stride, padding, dilation, groups = ctx.conv
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
        )
    grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype) if need_b else None
    grad_r = grad if (need_r and ctx.has_residual) else None
    return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None


def register_fake_and_autograd(op: Any) -> None:
    """Registers the shared fake implementation and backward formula on a conv_bias_act op."""
    torch.library.register_fake(op, fake_conv_bias_act)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)
