"""Train-mode end of a residual block with a projection shortcut, relu(BN(conv(h)) + BN_s(conv_s(x))), as one
autograd Function: both BNs are applied in the unit's single pass.

As two units (conv_bn_act_train.py), the shortcut's unit would write BN_s(y_s) and the block end read it back; in
backward, remaking it for the ReLU mask would write and read it again. Here the block end takes y_s, the shortcut's
raw conv output, as its residual with BN_s's scale per channel and BN_s's shift folded into its own:

  forward    y = conv(h), y_s = conv_s(x); each one's statistics, finalize and running-stat update
             (conv_bn_act_train.batch_norm_forward); out = relu(y·scale + (shift + shift_s) + y_s·scale_s)
  backward   the block end's unit as ever (conv_bn_act_train.unit_backward), its mask recomputed from y and y_s,
             storing g'; then the shortcut's unit on g', which is its BN output's gradient, without a mask

Saved: h and x (or their recipes), both weights, y and y_s, and each BN's per-channel vectors; the output's recipe
is (y, scale, shift + shift_s, y_s, scale_s), tensors the unit keeps anyway. Every pass implementation takes the
residual scale (passes.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv_config import ConvConfig
from . import recipes
from .conv_bn_act_train import TENSORS_PER_UNIT, Unit, autocast_off, batch_norm_forward, unit_backward
from .first_order import first_order_only
from .passes import PASSES
from .recipes import Recipe, recipe_of, releasing, remade, saved_form
from .sync import sync_group


def _conv_bn(
    x: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    bn: nn.BatchNorm2d,
    config: ConvConfig,
    relu: bool,
    passes: str,
) -> Unit:
    """One conv → BN of the block end: the conv, its batch statistics and bn's running-stat update."""
    y = F.conv2d(x, weight, None, config.stride, config.padding, config.dilation, config.groups)
    group = sync_group(bn)
    count, mean, invstd, scale, shift = batch_norm_forward(y, bn, gamma, beta, group, passes)
    return Unit(weight, y, mean, invstd, gamma, beta, scale, shift, config, relu, group, passes, count)


class ProjectionEndTrain(torch.autograd.Function):
    """apply(h, weight, gamma, beta, x, weight_s, gamma_s, beta_s, h_recipe | None, x_recipe | None, bn, bn_s,
    config, config_s, passes) -> (out, y, scale, shift, y_s, scale_s): out = relu(bn(conv(h)) + bn_s(conv_s(x))),
    with `shift` the block end's and the shortcut's shifts together; y and the vectors (not differentiable) are the
    makings of out's recipe."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        x: torch.Tensor,
        weight_s: torch.Tensor,
        gamma_s: torch.Tensor | None,
        beta_s: torch.Tensor | None,
        h_recipe: Recipe | None,
        x_recipe: Recipe | None,
        bn: nn.BatchNorm2d,
        bn_s: nn.BatchNorm2d,
        config: ConvConfig,
        config_s: ConvConfig,
        passes: str,
    ) -> tuple[torch.Tensor, ...]:
        with autocast_off(h.device.type):  # the caller chose the compute dtype
            end = _conv_bn(h, weight, gamma, beta, bn, config, True, passes)
            short = _conv_bn(x, weight_s, gamma_s, beta_s, bn_s, config_s, False, passes)
            # The block end's pass adds both shifts: its backward recomputes the mask with the sum.
            end = dataclasses.replace(end, shift=end.shift + short.shift)
            out = PASSES[passes].normalize(end.y, end.scale, end.shift, short.y, True, short.scale)
        ctx.settings = end.settings(), short.settings()
        ctx.set_materialize_grads(False)
        y, scale, total_shift, y_s, scale_s = end.y, end.scale, end.shift, short.y, short.scale
        ctx.mark_non_differentiable(y, scale, total_shift, y_s, scale_s)
        saved_h, ctx.h_spec = saved_form(h_recipe or h)
        saved_x, ctx.x_spec = saved_form(x_recipe or x)
        ctx.n_h, ctx.n_x = len(saved_h), len(saved_x)
        ctx.save_for_backward(*saved_h, *saved_x, *end.tensors(), *short.tensors())
        return out, y, scale, total_shift, y_s, scale_s

    @staticmethod
    @first_order_only  # backward runs custom kernels: a gradient of it would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor | None, *_: Any) -> tuple:
        with releasing(ctx, ctx.h_spec, ctx.x_spec):
            return _backward(ctx, grad_out)


def _backward(ctx: Any, grad_out: torch.Tensor | None) -> tuple:
    if grad_out is None:  # only the non-differentiable outputs were used
        return (None,) * 15
    saved = ctx.saved_tensors
    n_h, n_inputs = ctx.n_h, ctx.n_h + ctx.n_x
    units = saved[n_inputs:]  # the block end's tensors, then the shortcut's (Unit.tensors)
    end = Unit(*units[:TENSORS_PER_UNIT], *ctx.settings[0])
    short = Unit(*units[TENSORS_PER_UNIT:], *ctx.settings[1])
    needs = ctx.needs_input_grad
    needs_end, needs_short = needs[0:4], needs[4:8]
    # g' is the shortcut's gradient too: stored where the shortcut's unit needs anything.
    grads, masked = unit_backward(
        end, grad_out, short.y, short.scale, any(needs_short), needs_end,
        lambda: remade(saved[:n_h], ctx.h_spec) if needs_end[1] else saved[0],
    )  # fmt: skip
    grads_s: tuple = (None,) * 4
    if any(needs_short):
        grads_s, _ = unit_backward(
            short, masked, None, None, False, needs_short,
            lambda: remade(saved[n_h:n_inputs], ctx.x_spec) if needs_short[1] else saved[n_h],
        )  # fmt: skip
    return (*grads, *grads_s) + (None,) * 7


def projection_end_train(
    h: torch.Tensor,
    weight: torch.Tensor,
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    weight_s: torch.Tensor,
    bn_s: nn.BatchNorm2d,
    config: ConvConfig,
    config_s: ConvConfig,
    passes: str = "torch",
) -> torch.Tensor:
    """relu(bn(conv(h, weight)) + bn_s(conv(x, weight_s))) with batch statistics (global ones where a BN is marked
    for SyncBN), updating each BN's running stats once; h, x and the weights share one dtype; `passes` names the
    implementation of the passes over the conv outputs (training/passes.py)."""
    plain = torch.compiler.is_compiling() or recipes.hooks_active()  # no recipes: see recipes.py
    h_recipe = None if plain else recipe_of(h, passes)
    x_recipe = None if plain else recipe_of(x, passes)
    out, y, scale, shift, y_s, scale_s = ProjectionEndTrain.apply(
        h, weight, bn.weight, bn.bias, x, weight_s, bn_s.weight, bn_s.bias, h_recipe, x_recipe,
        bn, bn_s, config, config_s, passes,
    )  # fmt: skip
    if not plain and out.grad_fn is not None:  # only then does the unit keep y for its backward
        out.grad_fn.made_recipe = recipes.record(out, y, scale, shift, y_s, None, True, passes, residual_scale=scale_s)
    return out
