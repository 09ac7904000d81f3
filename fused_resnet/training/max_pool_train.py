"""The stem's max-pool without keeping its input: backward remakes the input from its recipe and pools again.

Stock max-pool keeps its input (the stem's post-ReLU activation) and the argmax indices (int64, four times the
bytes of a bf16 output) for backward: about a fifth of what a fused ResNet would otherwise keep. The input is the
stem unit's output, which recipes.py can remake from the raw conv output the stem keeps anyway; pooling
the bit-identical remade tensor again gives the same indices (the first maximum in each window).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from .recipes import Recipe, hooks_active, recipe_of, release, remade, saved_form


class MaxPoolOfRecipe(torch.autograd.Function):
    """apply(x, recipe, kernel_size, stride, padding, dilation, ceil_mode) -> max_pool2d(x) (pairs of ints)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        recipe: Recipe,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> torch.Tensor:
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        tensors, ctx.spec = saved_form(recipe)
        ctx.save_for_backward(*tensors)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        try:
            x = remade(ctx.saved_tensors, ctx.spec)
            ceil_mode = ctx.pool[4]
            kernel_size, stride, padding, dilation = (list(v) for v in ctx.pool[:4])
            _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
            grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices
            )
        finally:
            release(ctx.spec)
        return (grad_x,) + (None,) * 6


def max_pool_train(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor | None:
    """pool(x) through MaxPoolOfRecipe where x is a fused unit's output with a recipe and autograd will need the
    input; None where the stock pool should run."""
    if pool.return_indices or not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return None
    if hooks_active():
        return None
    recipe = recipe_of(x)
    if recipe is None:
        return None
    stride = pool.stride if pool.stride else pool.kernel_size  # as F.max_pool2d: no stride means the kernel size
    pairs = (_pair(v) for v in (pool.kernel_size, stride, pool.padding, pool.dilation))
    return MaxPoolOfRecipe.apply(x, recipe, *pairs, pool.ceil_mode)
