"""The stem's max-pool without keeping its input: backward remakes the input from its recipe and pools again.

Stock max-pool keeps its input (the stem's post-ReLU activation) and the argmax indices (int64, four times the
bytes of a bf16 output) for backward: about a fifth of what a fused ResNet would otherwise keep. The input is the
stem unit's output, which recipes.py can remake from the raw conv output the stem keeps anyway; pooling
the bit-identical remade tensor again gives the same indices (the first maximum in each window).

With the extension's CUDA passes (recipe passes "cpp" on CUDA; 16-byte channel vectors, dilation 1) both
directions are the extension's kernels (csrc/cuda/max_pool.cu): the forward pools with torch's values, and
backward neither remakes the input nor pools it again: one kernel recomputes each window's argmax from the
stem's raw conv output (a byte per window and channel), another gathers the gradient, as torch's CUDA max-pool
would have (its tie and NaN rules, fp32 sums in its order). On the H200 ATen's pooling took 0.82 ms a call to
read 411 MB and write 103 MB, and its backward 1.83 ms, for ResNet-50 at b256 (2026-11-27_H200_run4); these
kernels' own time awaits a GPU run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import cpp_backend
from .first_order import first_order_only
from .recipes import Recipe, hooks_active, recipe_of, release, remade, saved_form

_POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """Windows along an axis, as torch's max_pool2d counts them at dilation 1 (csrc/cuda/max_pool.cu's twin)."""
    windows = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (windows - 1) * stride >= size + pad:  # the last window would start in the padding
        windows -= 1
    return windows


def _fake_max_pool(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool
) -> torch.Tensor:
    n, c, h, w = x.shape
    oh, ow = (pooled_size(*args, ceil_mode) for args in zip((h, w), kernel_size, stride, padding, strict=True))
    return torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _fake_max_pool_backward(grad: torch.Tensor, y: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)


_FAKES = {"max_pool_nhwc": _fake_max_pool, "max_pool_bn_act_backward": _fake_max_pool_backward}
if cpp_backend.ops_built(_FAKES):
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"fused_resnet_C::{_name}", _fake)


def extension_pools(
    x: torch.Tensor,
    recipe: Recipe,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    device_type: str = "cuda",
) -> bool:
    """Whether the extension's CUDA max-pool kernels take this pool of x, the output of the unit `recipe` remakes:
    x and the unit's y channels_last on CUDA (so that the unit's output came from csrc/cuda/bn_train.cu's normalize,
    the arithmetic the backward kernel repeats), 16 or 32 bits, channels in whole 16-byte vectors, dilation 1,
    padding at most half the kernel (torch's own limit), kernel and stride at most 1024, windows of at most 254 taps
    and fewer than 2^31 pixels an image (the ops' limits). The ops have CUDA kernels only; device_type is for tests
    that give them another."""
    return (
        recipe.passes == "cpp"
        and x.device.type == device_type
        and x.dtype in _POOL_DTYPES
        and x.dim() == 4
        and x.shape[1] % (16 // x.element_size()) == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and recipe.y is not None
        and recipe.y.is_contiguous(memory_format=torch.channels_last)
        and x.shape[2] * x.shape[3] < 2**31
        and dilation == (1, 1)
        and all(2 * p <= k <= 1024 for p, k in zip(padding, kernel_size, strict=True))
        and all(0 < s <= 1024 for s in stride)
        and kernel_size[0] * kernel_size[1] < 255
        and cpp_backend.unavailable(device_type) is None
    )


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
        # The extension's kernels where they take the pool; backward then gathers from the recipe's y directly
        # (a recipe with a residual is remade as before).
        extension = extension_pools(x, recipe, kernel_size, stride, padding, dilation)
        ctx.gather = extension and recipe.residual is None
        if extension:
            return torch.ops.fused_resnet_C.max_pool_nhwc(x, kernel_size, stride, padding, ceil_mode)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)

    @staticmethod
    @first_order_only  # backward runs custom kernels: a gradient of it would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        try:
            if ctx.gather:
                y, scale, shift = ctx.saved_tensors
                kernel_size, stride, padding = ctx.pool[:3]
                grad_x = torch.ops.fused_resnet_C.max_pool_bn_act_backward(
                    grad_out, y, scale, shift, ctx.spec.relu, kernel_size, stride, padding
                )
                return (grad_x,) + (None,) * 6
            x = remade(ctx.saved_tensors, ctx.spec)
            ceil_mode = ctx.pool[4]
            kernel_size, stride, padding, dilation = (list(v) for v in ctx.pool[:4])
            _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
            grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices
            )
            return (grad_x,) + (None,) * 6
        finally:
            release(ctx.spec)


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
