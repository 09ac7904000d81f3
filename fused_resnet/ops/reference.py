"""The reference backend: plain PyTorch ops written for clarity. It defines the semantics every other
backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_config import ConvConfig


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
    """act(conv(pre(x), weight) + bias + residual), computed in the input dtype by stock PyTorch.

    pre(x) = relu(x·in_scale[c] + in_shift[c]) when in_scale is given (a folded pre-activation BN + ReLU),
    else x. The conv's zero padding is applied after pre(), so padded pixels are exactly 0.
    """
    if in_scale is not None:
        x = bn_act(x, in_scale, in_shift, relu=True)
    y = F.conv2d(x, weight, bias.to(x.dtype), config.stride, config.padding, config.dilation, config.groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def bn_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    """act(x * scale[c] + shift[c]): an eval-mode BatchNorm (folded to a per-channel affine) and ReLU."""
    y = x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    return torch.relu(y) if relu else y
