"""Train-mode act(BN(conv(x)) + residual) as one autograd Function that recomputes instead of storing.

Forward, in the order the GPU kernels will run it:
  1. y = conv(x)                              (raw conv output; its kernel's epilogue will emit the partials)
  2. per-channel (count, mean, M2) partials of y, merged with Chan's formula [+ all-gathered for SyncBN]
  3. finalize: mean, invstd and the running-stat update, once, with scale/shift (on CUDA: in the statistics' own
     merge kernel, cpp_passes.stats_finalize, or one launch of channel_math.py)
  4. out = act(y·scale + shift + residual)    (one elementwise pass; scale = γ·invstd, shift = β − mean·scale)
Saved for backward: x, the conv weight, y, mean, invstd (per channel), γ, β, and the residual only where a ReLU
follows the add (the mask needs it; an identity shortcut is the block input, whose storage the block's first
conv saves anyway). Neither the normalized y nor the activation is saved: backward recomputes the ReLU mask from
y in the same single pass that reduces Σg and Σg·(y − mean); on CUDA the kernel that merges those sums goes on to
dL/dγ and the coefficients of BN's input gradient (cpp_passes.grad_sums_coefficients), or channel_math.py does in one
launch.

Where x or the residual is another fused unit's output with a recipe (recipes.py: a bottleneck's inner
activations, most block outputs), the unit saves the recipe's tensors, which their own units keep anyway, instead
of the tensor, and backward remakes it. torch.compile runs without recipes (Inductor chooses what to recompute
itself). Backward is first order only: a second differentiation raises (first_order.py). batch_norm_forward (steps
2-3) and unit_backward are shared with the block end of a projection shortcut (projection_train.py), which runs two
such units in one.

Without a conv (weight=None) the same Function is a train-mode BN + act (pre-activation units): y = x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv_config import ConvConfig
from . import cpp_passes, recipes
from .first_order import first_order_only
from .passes import PASSES
from .recipes import Recipe, recipe_of, releasing, remade, saved_form
from .stats import check_count, finalize, total_count
from .sync import all_gather_stats, all_reduce_sum, sync_group

try:
    from . import channel_math
except ImportError:  # triton is optional: the per-channel arithmetic then runs as PyTorch ops
    channel_math = None


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for device_type: torch.autocast(enabled=False) where autocast is on, else a no-op
    (the context costs ~4 µs of host time per unit, and without autocast it would change nothing)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call where t has that dtype already (~1 µs of host time each, several per unit)."""
    return t if t.dtype == dtype else t.to(dtype)


def _one_launch(y: torch.Tensor, passes: str) -> bool:
    return channel_math is not None and channel_math.applies(y, passes)


def _scale_shift(
    mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(shift.dtype)
    return scale.contiguous(), shift.contiguous()


def batch_norm_forward(
    y: torch.Tensor,
    bn: nn.BatchNorm2d,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    group: Any,
    passes: str,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, invstd, scale, shift) of y's batch statistics (the global batch's where group is set), with
    bn's running-stat update, once: steps 2 and 3 of a unit's forward."""
    # Locally the count is known from the shape; only synchronized stats must read it from the data.
    count = y.numel() // y.shape[1] if y.shape[1] else 0
    if group is None and passes == "cpp" and cpp_passes.finalize_applies(y, bn, gamma, beta):
        check_count(count)  # the same arithmetic as below, done by the statistics' own kernels
        mean, invstd, scale, shift = cpp_passes.stats_finalize(y, bn, gamma, beta, count)
        return count, mean, invstd, scale, shift
    stats = PASSES[passes].stats(y)
    if group is not None:
        stats = all_gather_stats(stats, group)
        count = total_count(stats)
    if _one_launch(y, passes):  # the same arithmetic as below, in one launch
        check_count(count)
        mean = stats.mean.contiguous()
        invstd, scale, shift = channel_math.finalize_scale_shift(mean, stats.m2.contiguous(), count, bn, gamma, beta)
    else:
        mean, invstd = finalize(stats, bn, count)
        scale, shift = _scale_shift(mean, invstd, gamma, beta)
    return count, mean, invstd, scale, shift


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
        with autocast_off(x.device.type):
            y = x
            if weight is not None:
                y = F.conv2d(x, weight, None, config.stride, config.padding, config.dilation, config.groups)
            count, mean, invstd, scale, shift = batch_norm_forward(y, bn, gamma, beta, group, passes)
            out = PASSES[passes].normalize(y, scale, shift, residual, relu)
        ctx.config, ctx.relu, ctx.group, ctx.passes = config, relu, group, passes
        ctx.count = count
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(y, scale, shift)
        # Kept for backward: x for the weight gradient, the residual for the ReLU mask, each as itself or as the
        # tensors of its recipe.
        x_item = (x_recipe or x) if weight is not None else None
        residual_item = (residual_recipe or residual) if relu and residual is not None else None
        saved_x, ctx.x_spec = saved_form(x_item)
        saved_residual, ctx.residual_spec = saved_form(residual_item)
        ctx.n_x, ctx.n_residual = len(saved_x), len(saved_residual)
        ctx.save_for_backward(*saved_x, *saved_residual, weight, y, mean, invstd, gamma, beta, scale, shift)
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
    @first_order_only  # backward runs custom kernels: a gradient of it would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple:
        with releasing(ctx, ctx.x_spec, ctx.residual_spec):
            return _backward(ctx, grad_out)


@dataclass
class Unit:
    """What one conv → BN [+ residual] → act unit's backward needs besides the incoming gradient: its saved
    tensors, in the order the Functions save them (weight None: no conv), and settings."""

    weight: torch.Tensor | None
    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    scale: torch.Tensor
    shift: torch.Tensor
    config: ConvConfig
    relu: bool
    group: Any
    passes: str
    count: int

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors, in field order: what the unit's Function saves for backward."""
        return self.weight, self.y, self.mean, self.invstd, self.gamma, self.beta, self.scale, self.shift

    def settings(self) -> tuple:
        """The fields after the tensors, in order: what the Function keeps on its ctx."""
        return self.config, self.relu, self.group, self.passes, self.count


TENSORS_PER_UNIT = 8  # len(Unit.tensors())


def _sums_then_coefficients(
    unit: Unit,
    g: torch.Tensor,
    residual: torch.Tensor | None,
    residual_scale: torch.Tensor | None,
    store_masked: bool,
    need_gamma: bool,
    need_dy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(Σg', dL/dγ, g' where stored, b, c): the passes' sums, then dL/dγ and the coefficients, each where needed
    (else None), in launches of their own. SyncBN all-reduces the sums for the coefficients only."""
    y, mean, invstd, scale = unit.y, unit.mean, unit.invstd, unit.scale
    sum_g, sum_gy, masked = PASSES[unit.passes].grad_sums(
        g, y, scale, unit.shift, residual, mean, unit.relu, store_masked, residual_scale
    )
    grad_gamma = sum_gy * invstd if need_gamma else None
    if not need_dy:
        return sum_g, grad_gamma, masked, None, None
    global_g = sum_g
    if unit.group is not None:
        global_g, sum_gy = all_reduce_sum(torch.stack([sum_g, sum_gy]), unit.group).unbind(0)
    if _one_launch(y, unit.passes):
        b, c = channel_math.coefficients(scale, global_g.contiguous(), sum_gy.contiguous(), invstd, mean, unit.count)
    else:
        k = invstd.square() * sum_gy / unit.count
        b, c = -scale * k, scale * (k * mean - global_g / unit.count)
    return sum_g, grad_gamma, masked, b, c


def unit_backward(
    unit: Unit,
    g: torch.Tensor,
    residual: torch.Tensor | None,
    residual_scale: torch.Tensor | None,
    store_masked: bool,
    needs: tuple[bool, bool, bool, bool],
    x_of: Callable[[], torch.Tensor],
) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor | None]:
    """((dL/dx, dL/dW, dL/dγ, dL/dβ) where `needs` says so (else None), g' where stored or without a ReLU): the
    backward of one unit, whose pre-activation had `residual` (times residual_scale) added; x_of() gives the conv
    input for the weight gradient."""
    need_x, need_w, need_gamma, need_beta = needs
    y, scale, shift = unit.y, unit.scale, unit.shift
    if unit.group is None and unit.passes == "cpp" and cpp_passes.coefficients_apply(y, unit.invstd):
        sum_g, grad_gamma, masked, b, c = cpp_passes.grad_sums_coefficients(
            g, y, scale, shift, residual, unit.mean, unit.invstd, unit.relu, store_masked, unit.count, residual_scale
        )
    else:
        sum_g, grad_gamma, masked, b, c = _sums_then_coefficients(
            unit, g, residual, residual_scale, store_masked, need_gamma, need_x or need_w
        )
    if not unit.relu:
        masked = g
    grad_gamma = as_dtype(grad_gamma, unit.gamma.dtype) if need_gamma else None
    grad_beta = as_dtype(sum_g, unit.beta.dtype) if need_beta else None
    grad_x = grad_w = None
    if need_x or need_w:
        run = PASSES[unit.passes]
        if masked is not None:  # g' is at hand: no need to recompute the mask
            dy = run.grad_input(masked, y, scale, shift, None, scale, b, c, False)
        else:
            dy = run.grad_input(g, y, scale, shift, residual, scale, b, c, True, residual_scale)
        if unit.weight is None:
            grad_x = dy
        else:
            config = unit.config
            stride, padding, dilation = (list(v) for v in (config.stride, config.padding, config.dilation))
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                dy, x_of(), unit.weight, None, stride, padding, dilation, False, [0, 0], config.groups,
                [need_x, need_w, False],
            )  # fmt: skip
    return (grad_x, grad_w, grad_gamma, grad_beta), masked


def _backward(ctx: Any, grad_out: torch.Tensor | None) -> tuple:
    saved = ctx.saved_tensors
    n_x, n_kept = ctx.n_x, ctx.n_x + ctx.n_residual
    weight, y, mean, invstd, gamma, beta, scale, shift = saved[n_kept:]
    need_r = ctx.needs_input_grad[4]
    if grad_out is None:  # only the non-differentiable outputs were used
        return (None,) * 12
    residual = remade(saved[n_x:n_kept], ctx.residual_spec)
    unit = Unit(weight, y, mean, invstd, gamma, beta, scale, shift, ctx.config, ctx.relu, ctx.group, ctx.passes,
                ctx.count)  # fmt: skip
    store_masked = ctx.relu and need_r and ctx.has_residual
    grads, masked = unit_backward(
        unit, grad_out, residual, None, store_masked, ctx.needs_input_grad[:4],
        lambda: remade(saved[:n_x], ctx.x_spec) if ctx.needs_input_grad[1] else saved[0],
    )  # fmt: skip
    grad_r = masked if need_r and ctx.has_residual else None
    return (*grads, grad_r) + (None,) * 7


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
    plain = torch.compiler.is_compiling() or recipes.hooks_active()  # no recipes: see recipes.py
    x_recipe = None if plain or weight is None else recipe_of(x, passes)
    residual_recipe = None if plain or residual is None else recipe_of(residual, passes)
    out, y, scale, shift = ConvBNActTrain.apply(
        x, weight, bn.weight, bn.bias, residual, x_recipe, residual_recipe,
        bn, config or ConvConfig(), relu, sync_group(bn), passes,
    )  # fmt: skip
    if not plain and out.grad_fn is not None:  # only then does the unit keep y for its backward
        out.grad_fn.made_recipe = recipes.record(out, y, scale, shift, residual, residual_recipe, relu, passes)
    return out
