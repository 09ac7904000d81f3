"""Checks and fixtures shared by the model and training test files."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fused_resnet import ConvBNAct


def assert_deep_net_trains_and_evaluates(model: nn.Module) -> None:
    """A 1000+ layer CIFAR net: finite output, input and parameter gradients in train mode, finite eval output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def stock_unit(m: ConvBNAct, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """What a ConvBNAct computes, through its own stock conv and BN modules."""
    y = m.bn(m.conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if m.relu else y


def stock_channels_last(model: nn.Module) -> nn.Module:
    """A copy of a stock model in the fused models' layout: oneDNN sums in another order for NHWC, and that, not
    the fusion, is most of the fp32 difference (measured: NCHW stock is ~2-4x closer to fp64 after 3 steps)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def randomized_batch_norm(
    channels: int, momentum: float | None, affine: bool, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d whose running stats and affine parameters are not their initial 0/1 values, so that a
    formula that mixes them up shows."""
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine).to(device, dtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn
