"""The fused training Functions' backward runs custom kernels and records no graph of its own: first order only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

DOUBLE_BACKWARD = (
    "a fused train-mode unit's backward is not differentiable (it runs custom kernels), so a gradient of a gradient "
    "(create_graph=True then a second differentiation: a gradient penalty, a Hessian-vector product, MAML) cannot go "
    "through it; run such models with fused_resnet.set_backend(model, 'reference'), whose training is stock PyTorch"
)


class _SecondOrderRaises(torch.autograd.Function):
    """Copies of a backward's gradients, tied to what they depend on: a second differentiation that reaches them
    raises (instead of finding no path and giving None or zeros)."""

    @staticmethod
    def forward(ctx: Any, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        raise RuntimeError(DOUBLE_BACKWARD)


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A Function's backward whose gradients cannot be differentiated again. Under create_graph=True (autograd runs
    backward with grad mode on) they are still right, and a second differentiation that reaches them raises.
    torch.autograd.function.once_differentiable ties its outputs to nothing: a torch.autograd.grad(...,
    allow_unused=True) of them gave None, and a Hessian-vector product zeros, without an error (an audit)."""

    @functools.wraps(backward)
    def checked(ctx: Any, *grads: Any) -> Any:
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        sources = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        where = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
        if not sources or not where:
            return outputs
        tied = _SecondOrderRaises.apply(len(where), *(outputs[i] for i in where), *sources)
        result = list(outputs)
        for i, t in zip(where, tied, strict=True):
            result[i] = t
        return tuple(result)

    return checked
