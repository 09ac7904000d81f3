"""Train-mode act(BN(conv(x)) + residual) as one autograd Function that recomputes instead of storing.

Forward, in the order the GPU kernels will run it:
  1. y = conv(x)                              (raw conv output; its kernel's epilogue will emit the partials)
  2. per-channel (count, mean, M2) partials of y, merged with Chan's formula [+ all-gathered for SyncBN]
  3. finalize: mean, invstd and the running-stat update, once
  4. out = act(y·scale + shift + residual)    (one elementwise pass; scale = γ·invstd, shift = β − mean·scale)
Saved for backward: x, the conv weight, y, mean, invstd (per channel), γ, β, and the residual only where a ReLU
follows the add (the mask needs it; an identity shortcut is the block input, whose storage the block's first
conv saves anyway). Neither the normalized y nor the activation is saved: backward recomputes the ReLU mask from
y in the same single pass that reduces Σg and Σg·(y − mean).

Where x or the residual is the output of a previous unit without a residual of its own, act(y'·scale' + shift')
(a bottleneck's inner activations; a projection shortcut), the unit saves that recipe (y', which the previous
unit saves anyway, and two per-channel vectors) instead of the tensor, and backward recomputes it: the
activations inside a block and the projection shortcut's output are never kept for backward. A side table maps
such outputs to their recipes (weakly, checked against in-place changes; writes through `tensor.data` bypass
the version counter and are not seen, as for autograd's own saved tensors); torch.compile runs without it
(Inductor chooses what to recompute itself). Backward is once-differentiable: double backward raises.

Without a conv (weight=None) the same Function is a train-mode BN + act (pre-activation units): y = x.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from ..ops.conv_config import ConvConfig
from .passes import PASSES
from .stats import finalize, total_count
from .sync import all_gather_stats, all_reduce_sum, sync_group


def _scale_shift(
    mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(shift.dtype)
    return scale.contiguous(), shift.contiguous()


class Recipe(NamedTuple):
    """How a unit's output was made, exactly: PASSES[passes].normalize(y, scale, shift, None, relu)."""

    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    relu: bool
    passes: str
    version: int  # the output's version counter when made: an in-place change since then voids the recipe


_RECIPES: WeakIdKeyDictionary = WeakIdKeyDictionary()


class ConvBNActTrain(torch.autograd.Function):
    """apply(x, weight | None, gamma | None, beta | None, residual | None, x_recipe | None, residual_recipe | None,
    bn, config, relu, group | None, passes) -> (out, y, scale, shift).

    passes names the implementation of the passes over y (training/passes.py: "torch" or "triton"); a recipe says
    how x (or the residual) was made, so that backward remakes it instead of keeping it. y, scale and shift (not
    differentiable) are the makings of `out`'s own recipe.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        residual: torch.Tensor | None,
        x_recipe: Recipe | None,
        residual_recipe: Recipe | None,
        bn: nn.BatchNorm2d,
        config: ConvConfig,
        relu: bool,
        group: Any,
        passes: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The caller already chose the compute dtype; autocast must not re-cast anything in here.
        with torch.autocast(x.device.type, enabled=False):
            y = x
            if weight is not None:
                y = F.conv2d(x, weight, None, config.stride, config.padding, config.dilation, config.groups)
            run = PASSES[passes]
            stats = run.stats(y)
            # Locally the count is known from the shape; only synchronized stats must read it from the data.
            count = y.numel() // y.shape[1] if y.shape[1] else 0
            if group is not None:
                stats = all_gather_stats(stats, group)
                count = total_count(stats)
            mean, invstd = finalize(stats, bn, count)
            scale, shift = _scale_shift(mean, invstd, gamma, beta)
            out = run.normalize(y, scale, shift, residual, relu)
        ctx.config, ctx.relu, ctx.group, ctx.passes = config, relu, group, passes
        ctx.count = count
        ctx.has_conv, ctx.has_residual = weight is not None, residual is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(y, scale, shift)
        # Kept for backward: x for the weight gradient, the residual for the ReLU mask, each as itself or as the
        # tensors of its recipe.
        x_recipe = x_recipe if weight is not None else None
        residual_recipe = residual_recipe if relu and residual is not None else None
        ctx.x_recipe, ctx.residual_recipe = _recipe_flags(x_recipe), _recipe_flags(residual_recipe)
        saved_x = _recipe_tensors(x_recipe) if x_recipe else (x if weight is not None else None, None, None)
        kept_residual = residual if relu and residual_recipe is None else None
        saved_residual = _recipe_tensors(residual_recipe) if residual_recipe else (kept_residual, None, None)
        ctx.save_for_backward(*saved_x, *saved_residual, weight, y, mean, invstd, gamma, beta)
        # Without a conv y is the input x: autograd wants a distinct tensor object for an output.
        return out, y if weight is not None else y.detach(), scale, shift

    # z = γ·x̂ + β [+ r],  x̂ = (y − μ)·σ⁻¹,  out = relu(z) or z;  over the (global) batch of n values per channel:
    #   g' = g·1[z > 0]
    #   dL/dr = g',  dL/dβ = Σg',  dL/dγ = Σg'·x̂ = σ⁻¹·Σg'·(y − μ)
    #   dL/dy = γσ⁻¹·(g' − Σg'/n − x̂·Σg'x̂/n)  =  a·g' + b·y + c  per channel, with
    #     a = γσ⁻¹,  k = σ⁻²·Σg'(y − μ)/n,  b = −a·k,  c = a·(k·μ − Σg'/n)
    #   (dL/dx, dL/dW) = convolution_backward(dL/dy, x, W)
    # SyncBN: the two sums in dL/dy run over every process's batch (all-reduced); dL/dγ, dL/dβ stay local, as in
    # nn.SyncBatchNorm, because DistributedDataParallel averages parameter gradients itself.
    @staticmethod
    @once_differentiable  # backward runs custom kernels: a gradient of it would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple:
        saved = ctx.saved_tensors
        x, weight, y, mean, invstd, gamma, beta = saved[0], *saved[6:]
        need_x, need_w, need_gamma, need_beta, need_r = ctx.needs_input_grad[:5]
        if grad_out is None:  # only the non-differentiable outputs were used
            return (None,) * 12
        residual = _remade(saved[3:6], ctx.residual_recipe)
        run = PASSES[ctx.passes]
        scale, shift = _scale_shift(mean, invstd, gamma, beta)
        sum_g, sum_gy, masked = run.grad_sums(
            grad_out, y, scale, shift, residual, mean, ctx.relu, ctx.relu and need_r and ctx.has_residual
        )
        if not ctx.relu:
            masked = grad_out
        grad_gamma = (sum_gy * invstd).to(gamma.dtype) if need_gamma else None
        grad_beta = sum_g.to(beta.dtype) if need_beta else None
        grad_x = grad_w = None
        if need_x or need_w:
            if ctx.group is not None:
                sum_g, sum_gy = all_reduce_sum(torch.stack([sum_g, sum_gy]), ctx.group).unbind(0)
            a = scale
            k = invstd.square() * sum_gy / ctx.count
            b, c = -a * k, a * (k * mean - sum_g / ctx.count)
            if masked is not None:  # g' is at hand: no need to recompute the mask
                dy = run.grad_input(masked, y, scale, shift, None, a, b, c, False)
            else:
                dy = run.grad_input(grad_out, y, scale, shift, residual, a, b, c, True)
            if not ctx.has_conv:
                grad_x = dy
            else:
                if need_w:
                    x = _remade(saved[0:3], ctx.x_recipe)
                stride, padding, dilation = (
                    list(v) for v in (ctx.config.stride, ctx.config.padding, ctx.config.dilation)
                )
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    dy,
                    x,
                    weight,
                    None,
                    stride,
                    padding,
                    dilation,
                    False,
                    [0, 0],
                    ctx.config.groups,
                    [need_x, need_w, False],
                )
        grad_r = masked if need_r and ctx.has_residual else None
        return (grad_x, grad_w, grad_gamma, grad_beta, grad_r) + (None,) * 7


def conv_bn_act_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bn: nn.BatchNorm2d,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    config: ConvConfig | None = None,
    passes: str = "torch",
) -> torch.Tensor:
    """act(bn(conv(x, weight)) + residual) with batch statistics (global ones where bn is marked for SyncBN),
    updating bn's running stats once; weight=None skips the conv. x, weight and residual share one dtype;
    `passes` names the implementation of the passes over the conv output (training/passes.py)."""
    tracing = torch.compiler.is_compiling()
    x_recipe = None if tracing or weight is None else _recipe_of(x, passes)
    residual_recipe = None if tracing or residual is None else _recipe_of(residual, passes)
    out, y, scale, shift = ConvBNActTrain.apply(
        x, weight, bn.weight, bn.bias, residual, x_recipe, residual_recipe,
        bn, config or ConvConfig(), relu, sync_group(bn), passes,
    )  # fmt: skip
    if residual is None and not tracing:
        _RECIPES[out] = Recipe(y, scale, shift, relu, passes, out._version)
    return out


def _recipe_of(t: torch.Tensor, passes: str) -> Recipe | None:
    recipe = _RECIPES.get(t)
    if recipe is None or recipe.passes != passes or recipe.version != t._version:
        return None
    return recipe


def _recipe_tensors(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return recipe.y, recipe.scale, recipe.shift


def _recipe_flags(recipe: Recipe | None) -> tuple[bool, str] | None:
    return None if recipe is None else (recipe.relu, recipe.passes)


def _remade(saved: tuple, flags: tuple[bool, str] | None) -> torch.Tensor | None:
    """The saved tensor itself (first of `saved`), or the one its recipe's tensors make again."""
    if flags is None:
        return saved[0]
    relu, passes = flags
    y, scale, shift = saved
    return PASSES[passes].normalize(y, scale, shift, None, relu)
