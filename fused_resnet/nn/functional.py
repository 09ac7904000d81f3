"""conv → BatchNorm → [+ residual] → [ReLU] as one call: the single mechanism every fused module uses.

eval: BN folded into the conv (cached), then one fused conv_bias_act on the chosen backend.
train: batch statistics; running stats updated exactly as nn.BatchNorm2d does. Any backend but "reference"
runs the fused training Function (fused_resnet.training: statistics as Chan-merged partials, one BN-apply +
residual + ReLU pass, a backward that recomputes from the raw conv output); "reference" runs stock
F.conv2d → the BN module itself → add → relu. BNs marked by fused_resnet.training.enable_sync_bn always take the fused
path, which is the one that synchronizes statistics across processes. conv_bn_projection_act ends a block with a
projection shortcut: in fused training one unit applies both BNs in its one pass (training/projection_train.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends
from ..ops import cpp_backend, reference
from ..ops.checks import check_activation, check_conv_bias_act
from ..ops.conv_config import ConvConfig
from ..ops.eager import plain_eager_call
from ..training.conv_bn_act_train import as_dtype, conv_bn_act_train
from ..training.passes import passes_for
from ..training.projection_train import projection_end_train
from ..training.sync import sync_group
from . import eval_plans
from .folding import FOLDABLE_NORMS, bn_scale_shift, folded_conv_bn, module_tensor
from .hooks import global_forward_hooks, has_hooks


def compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the conv runs in: autocast's when it is on, else the parameters' (which x must match). Autocast
    leaves float64 alone, and so an fp64 model runs in fp64 under it too."""
    if torch.is_autocast_enabled(x.device.type) and param_dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != param_dtype:
        raise TypeError(
            f"input dtype {x.dtype} does not match the model's parameter dtype {param_dtype}; "
            "convert one of them (model.to(dtype) or x.to(dtype)) or run under torch.autocast"
        )
    return param_dtype


def uses_batch_stats(bn: nn.Module) -> bool:
    """True where BN normalizes with the batch's statistics (train mode, or no running stats)."""
    return isinstance(bn, _BatchNorm) and (bn.training or bn.running_mean is None)


def conv_unfusable(conv: nn.Conv2d) -> bool:
    """Whether a conv is no conv of the fused kernels."""
    # A subclass may override forward (weight standardization, a scaled conv); a bias, a padding mode other than
    # zeros or padding="same" set after the model was built is no conv of the fused kernels.
    return (
        type(conv) is not nn.Conv2d
        or module_tensor(conv, "bias") is not None
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    )


def runs_own_forwards(*modules: nn.Module | None) -> bool:
    """Whether a fused call over these modules (convs, BNs, pre-activation BN; None: absent) must run their own
    forwards instead: one with hooks (torch.nn.utils.weight_norm, spectral_norm and pruning recompute a conv's weight
    in a forward pre-hook; a user's hooks, or global module hooks, expect to see their module run), a norm the fused
    path does not know (FOLDABLE_NORMS: e.g. a BatchNorm2d subclass, whose forward may differ), or a conv that is not
    a plain zero-padded nn.Conv2d without bias (conv_unfusable)."""
    if global_forward_hooks():
        return True
    for module in modules:
        if module is None:
            continue
        if has_hooks(module):
            return True
        if conv_unfusable(module) if isinstance(module, nn.Conv2d) else type(module) not in FOLDABLE_NORMS:
            return True
    return False


def own_activation(act: nn.Module | None) -> bool:
    """Whether a call whose ReLU is this module (a block's `relu`; None: none given) must run the module itself: it has
    hooks (guided backprop's on nn.ReLU, a user's), or it is not an nn.ReLU at all (an activation swapped in after
    the model was fused). Global module hooks are runs_own_forwards' to see, which every caller asks as well."""
    return act is not None and (type(act) is not nn.ReLU or has_hooks(act))


def _own_forwards(
    x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module | None, residual: torch.Tensor | None, relu: bool,
    pre_bn: nn.Module | None, act: nn.Module | None = None,
) -> torch.Tensor:  # fmt: skip
    if pre_bn is not None:
        x = torch.relu(pre_bn(x))
    y = conv(x)
    if bn is not None:
        y = bn(y)
    if residual is not None:
        y = y + residual
    if not relu:
        return y
    return act(y) if act is not None else torch.relu(y)


def _fused_training(bn: nn.Module, backend: str) -> bool:
    # Subclasses of BatchNorm2d may override forward; only the exact class has known semantics.
    if type(bn) is not nn.BatchNorm2d:
        return False
    return backends.requested_backend(backend) != "reference" or sync_group(bn) is not None


def projection_trains_fused(bn: nn.Module, shortcut_bn: nn.Module, backend: str) -> bool:
    """Whether a block end with this BN and a projection shortcut with shortcut_bn runs as one fused training unit:
    both normalize with batch statistics on the fused path."""
    return all(uses_batch_stats(b) and _fused_training(b, backend) for b in (bn, shortcut_bn))


def _conv_input(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, ConvConfig, torch.dtype]:
    """x checked against conv and cast to the dtype the conv runs in, the conv's config and that dtype."""
    check_activation(x)
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"expected input with {conv.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    weight = module_tensor(conv, "weight")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the model's parameters are on {weight.device}")
    dtype = compute_dtype(x, weight.dtype)
    return x if x.dtype == dtype else x.to(dtype), ConvConfig.from_conv(conv), dtype


def _conv(x: torch.Tensor, conv: nn.Conv2d, config: ConvConfig) -> torch.Tensor:
    return F.conv2d(x, conv.weight.to(x.dtype), None, config.stride, config.padding, config.dilation, config.groups)


def conv_bn_act(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module | None,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    backend: str = "auto",
    allow_fallback: bool | None = None,
    pre_bn: nn.Module | None = None,
    donate_residual: bool = False,
    act: nn.Module | None = None,
) -> torch.Tensor:
    """act(bn(conv(pre(x))) + residual) with the modules' own parameters and each BN's mode.

    bn=None means no BN after the conv; pre_bn (with ReLU) is a pre-activation applied to x before the conv,
    as in pre-activation ResNets. In eval both BNs are folded and the whole call is one fused op.
    donate_residual=True says the caller never reads `residual` again: without autograd (no_grad /
    inference_mode), a backend that can writes the result into the residual's memory and returns it. `act`, where
    given, is the module whose ReLU this is (a block's `relu`): one with hooks, or not an nn.ReLU, is run itself.
    """
    plan = eval_plans.plan_of(conv)
    if plan is not None:  # the decisions of an earlier call with these operands, where they still hold
        out = plan.run(x, conv, bn, residual, relu, backend, allow_fallback, donate_residual, act, pre_bn)
        if out is not None:
            return out
    check_activation(x)
    # An empty batch trains as nn.BatchNorm2d's own forward does (an empty result, no statistics to take).
    empty_train = x.shape[0] == 0 and bn is not None and uses_batch_stats(bn)
    if runs_own_forwards(conv, bn, pre_bn) or (relu and own_activation(act)) or empty_train:
        return _own_forwards(x, conv, bn, residual, relu, pre_bn, act)  # the modules cast for autocast themselves
    x, config, dtype = _conv_input(x, conv)
    given_residual = residual
    if residual is not None:
        residual = as_dtype(residual, dtype)
    if pre_bn is not None and uses_batch_stats(pre_bn):
        x, pre_bn = bn_act(x, pre_bn, relu=True, backend=backend, allow_fallback=allow_fallback), None
    if bn is not None and uses_batch_stats(bn):
        if pre_bn is not None:
            x = bn_act(x, pre_bn, relu=True, backend=backend, allow_fallback=allow_fallback)
        if _fused_training(bn, backend):
            passes = passes_for(backend, x, allow_fallback)
            return conv_bn_act_train(x, as_dtype(conv.weight, dtype), bn, residual, relu, config, passes)
        y = bn(_conv(x, conv, config))  # stock nn.BatchNorm2d (or the subclass's own forward)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    weight, bias = folded_conv_bn(conv, bn, dtype)
    if residual is not None and residual.shape != (out_shape := config.output_shape(x, weight)):
        residual = _broadcast_residual(residual, out_shape)
    in_scale = in_shift = None
    if pre_bn is not None:
        in_scale, in_shift = bn_scale_shift(pre_bn)
    check_conv_bias_act(x, weight, bias, residual, config)
    chosen = backends.select(backend, x, weight, residual, config, pre_bn is not None, allow_fallback)
    donated = donate_residual and _writable(residual)
    into = donated and chosen.conv_bias_act_into_residual is not None
    eager = plain_eager_call(x)
    # Kept before the launch, which may write into a tensor the fold read (a donated residual that aliases it).
    if eager and residual is given_residual:  # taken as given: neither cast nor broadcast
        eval_plans.keep(
            x, conv, bn, residual, relu, backend, donate_residual, weight, bias, config, chosen, donated,
            pre_bn, in_scale, in_shift,
        )  # fmt: skip
    return eval_plans.launch_folded(
        chosen, x, conv, weight, bias, residual, config, relu, in_scale, in_shift, into, eager
    )


def _broadcast_residual(residual: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    # One that broadcasts, as `y + residual` takes it (stock, and the train path).
    try:
        return residual.expand(out_shape)
    except RuntimeError:
        raise ValueError(
            f"residual must have the output shape {tuple(out_shape)} or broadcast to it, got {tuple(residual.shape)}"
        ) from None


def conv_bn_projection_act(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    shortcut_x: torch.Tensor,
    shortcut_conv: nn.Conv2d,
    shortcut_bn: nn.Module,
    backend: str = "auto",
    allow_fallback: bool | None = None,
    act: nn.Module | None = None,
) -> torch.Tensor:
    """relu(bn(conv(x)) + shortcut_bn(shortcut_conv(shortcut_x))): a residual block's end with a projection
    shortcut. Where both BNs train fused (projection_trains_fused), one unit whose single pass applies both
    (training/projection_train.py); otherwise the shortcut is its own conv_bn_act call, whose output the block end
    takes as its residual (and may write into)."""
    own = runs_own_forwards(conv, bn, shortcut_conv, shortcut_bn) or own_activation(act) or x.shape[0] == 0
    if own or not projection_trains_fused(bn, shortcut_bn, backend):
        shortcut = conv_bn_act(shortcut_x, shortcut_conv, shortcut_bn, None, False, backend, allow_fallback)
        return conv_bn_act(x, conv, bn, shortcut, True, backend, allow_fallback, donate_residual=True, act=act)
    x, config, dtype = _conv_input(x, conv)
    shortcut_x, shortcut_config, _ = _conv_input(shortcut_x, shortcut_conv)
    passes = passes_for(backend, x, allow_fallback)
    weight, shortcut_weight = as_dtype(conv.weight, dtype), as_dtype(shortcut_conv.weight, dtype)
    return projection_end_train(
        x, weight, bn, as_dtype(shortcut_x, dtype), shortcut_weight, shortcut_bn, config, shortcut_config, passes
    )


def _writable(residual: torch.Tensor | None) -> bool:
    # Only without autograd (an in-place write would invalidate saved tensors), and not while torch.compile traces
    # (Inductor plans its own buffer reuse); only a dense channels_last residual takes the output as it is.
    return (
        residual is not None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and residual.is_contiguous(memory_format=torch.channels_last)
    )


def bn_act(
    x: torch.Tensor, bn: nn.Module, relu: bool = True, backend: str = "auto", allow_fallback: bool | None = None
) -> torch.Tensor:
    """act(bn(x)) with BN's mode: a pre-activation unit (fused into the next conv's prologue later)."""
    check_activation(x)
    if runs_own_forwards(bn):
        y = bn(x)
        return torch.relu(y) if relu else y
    if uses_batch_stats(bn):
        if _fused_training(bn, backend):
            return conv_bn_act_train(x, None, bn, None, relu, passes=passes_for(backend, x, allow_fallback))
        y = bn(x)
        return torch.relu(y) if relu else y
    scale, shift = bn_scale_shift(bn)
    # While a model's forward has the CPU convs' NaN scans off (models/_common.py), a NaN made here must turn them on.
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if x.device.type == "cpu" and not traced and not cpp_backend.cpu_input_scans():
        if not bool(torch.isfinite(scale + shift).all()):
            cpp_backend.set_cpu_input_scans(True)
    return reference.bn_act(x, scale, shift, relu)
