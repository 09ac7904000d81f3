"""The fused training Functions' backward runs custom kernels and records no graph of its own: first order only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

DOUBLE_BACKWARD = (
    "a fused train-mode unit's backward is not differentiable (it runs custom kernels), so create_graph=True (double "
    "backward: a gradient penalty, a Hessian-vector product, MAML) cannot go through it; run such models with "
    "fused_resnet.set_backend(model, 'reference'), whose training is stock PyTorch"
)


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A Function's backward that raises under create_graph=True, where autograd runs backward with grad mode on.
    torch.autograd.function.once_differentiable raises only when a second backward reaches its outputs, which it
    makes fresh leaves: a torch.autograd.grad(..., allow_unused=True) of them gave None, and a Hessian-vector product
    zeros, without an error (an audit)."""

    @functools.wraps(backward)
    def checked(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        return backward(ctx, *grads)

    return checked
