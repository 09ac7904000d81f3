"""Checks shared by the model test files."""

from __future__ import annotations

import torch
from torch import nn


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
