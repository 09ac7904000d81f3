"""An eval call's decisions, made once per conv and kept for its next eager calls with the same operands.

A fused eval call (nn/functional.py: conv_bn_act) checks its operands, folds BN (cached), chooses a backend and
checks the call against it. Done in full at every call that costs 60-120 µs of host time per conv (CI machine),
~15 % of a ResNet-50 forward at batch 1 on CPU. So the full path leaves an EvalPlan with the conv's cached fold: the
operands' signature (shapes, strides, dtype, device, the flags), the fold and the backend it chose. A later call with
the same signature runs the plan, re-checking at each call only what may have changed since and costs little to
ask: hooks (global and the modules'), the modules' kinds and modes, the conv's settings, the fold's tensors
(identity, version counter, storage: folding.fold_current) and the modes that decide the path (autograd, autocast,
tracing, dispatch modes, the profiler). A pre-activation prologue's norm is checked the same way, and its scale and
shift kept with the plan. Anything else runs the full path, which makes a new plan.

The backend choice is kept only for the "cpu" backend, whose choice depends on the device alone; the others
(CUDA, Triton) are chosen again at each call, as they depend on settings such as TF32 and the CUDA engine.
The plan lives in the fold's cache entry: whatever drops or replaces the fold (clear_caches, a refold) drops it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ops import cpp_backend
from ..ops.conv_config import ConvConfig
from ..ops.eager import plain_eager_call
from . import activation_bounds
from .folding import fold_current, fold_sources, kept_with_fold, norm_sources
from .hooks import global_forward_hooks, has_hooks

_PLAN = "eval_plan"


def _conv_settings(conv: nn.Conv2d) -> tuple:
    # What the full path reads of the conv besides its weight: ConvConfig.from_conv, conv_unfusable, _conv_input.
    d = conv.__dict__
    return (
        d.get("stride"), d.get("padding"), d.get("dilation"), d.get("groups"), d.get("padding_mode"),
        d.get("in_channels"), conv._parameters.get("bias"), conv._buffers.get("bias"), d.get("bias"),
    )  # fmt: skip


def _signature(x: torch.Tensor, residual: torch.Tensor | None, relu: bool, donate: bool, backend: str) -> tuple:
    r = None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device)
    return (x.shape, x.stride(), x.dtype, x.device, r, relu, donate, backends.requested_backend(backend))


def launch_folded(
    chosen: backends.Backend,
    x: torch.Tensor,
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
    relu: bool,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    into_residual: bool,
    eager: bool,
) -> torch.Tensor:
    """act(conv(pre(x), weight) + bias + residual) on `chosen`: written into the residual where into_residual, through
    the backend's direct launcher where eager (plain_eager_call), bounded while the CPU convs' NaN scans are off."""
    bound = None
    if chosen.name == "cpu" and activation_bounds.active():  # the CPU conv's NaN scans are off: see there
        bound = activation_bounds.output_bound(x, conv, weight, bias, residual, in_scale, in_shift)
        if bound is None:
            cpp_backend.set_cpu_input_scans(True)
            activation_bounds.stop()
    if into_residual:
        out = chosen.conv_bias_act_into_residual(x, weight, bias, residual, config, relu, in_scale, in_shift)
    else:
        run = chosen.launch if chosen.launch is not None and eager else chosen.conv_bias_act
        out = run(x, weight, bias, residual, config, relu, in_scale, in_shift)
    if bound is not None:
        activation_bounds.record(out, bound)
    return out


class EvalPlan:
    """One conv's eval call as the full path decided it (see the module's docstring)."""

    __slots__ = (
        "signature", "bn", "bn_type", "eps", "settings", "sources", "weight", "bias", "config", "chosen",
        "into_residual", "device_type", "order", "pre_bn", "pre_type", "pre_eps", "pre_sources",
        "in_scale", "in_shift",
    )  # fmt: skip

    def __init__(
        self,
        signature: tuple,
        conv: nn.Conv2d,
        bn: nn.Module | None,
        sources: tuple,
        weight: torch.Tensor,
        bias: torch.Tensor,
        config: ConvConfig,
        chosen: backends.Backend,
        into_residual: bool,
        device_type: str,
        prologue: tuple | None = None,
    ) -> None:
        self.signature, self.sources, self.weight, self.bias, self.config = signature, sources, weight, bias, config
        # The pre-activation's norm (pre-activation nets), what its scale and shift were made from, and them.
        self.pre_bn, self.pre_sources, self.in_scale, self.in_shift = prologue or (None, None, None, None)
        self.pre_type, self.pre_eps = type(self.pre_bn), getattr(self.pre_bn, "eps", None)
        self.bn, self.bn_type = bn, type(bn)
        self.eps = None if bn is None else bn.eps
        self.settings = _conv_settings(conv)
        self.chosen = chosen if chosen.name == "cpu" else None  # see the module's docstring
        self.order = backends.AUTO_ORDER.get(device_type)  # "auto"'s order then (a table a user may replace)
        self.into_residual = into_residual
        self.device_type = device_type

    def run(
        self,
        x: torch.Tensor,
        conv: nn.Conv2d,
        bn: nn.Module | None,
        residual: torch.Tensor | None,
        relu: bool,
        backend: str,
        allow_fallback: bool | None,
        donate: bool,
        act: nn.Module | None,
        pre_bn: nn.Module | None = None,
    ) -> torch.Tensor | None:
        """The call's result, or None where the plan does not hold for it (then the caller runs the full path)."""
        if type(conv) is not nn.Conv2d or bn is not self.bn or type(bn) is not self.bn_type:
            return None
        if pre_bn is not self.pre_bn or (pre_bn is not None and not self._prologue_holds(pre_bn)):
            return None
        if bn is not None and (bn.training or bn.eps != self.eps):
            return None
        if global_forward_hooks() or has_hooks(conv) or has_hooks(bn):
            return None
        if relu and act is not None and (type(act) is not nn.ReLU or has_hooks(act)):
            return None
        if not plain_eager_call(x) or torch.is_autocast_enabled(self.device_type):
            return None
        if _signature(x, residual, relu, donate, backend) != self.signature or _conv_settings(conv) != self.settings:
            return None
        if not fold_current(self.sources):
            return None
        chosen = self.chosen
        if (
            chosen is None
            or backends.loaded(chosen.name) is not chosen
            or self.order is not backends.AUTO_ORDER.get(self.device_type)
        ):
            prologue = self.pre_bn is not None
            chosen = backends.select(backend, x, self.weight, residual, self.config, prologue, allow_fallback)
        into = self.into_residual and chosen.conv_bias_act_into_residual is not None
        weight, bias, config, scale, shift = self.weight, self.bias, self.config, self.in_scale, self.in_shift
        return launch_folded(chosen, x, conv, weight, bias, residual, config, relu, scale, shift, into, True)

    def _prologue_holds(self, pre_bn: nn.Module) -> bool:
        if type(pre_bn) is not self.pre_type or pre_bn.training or pre_bn.eps != self.pre_eps or has_hooks(pre_bn):
            return False
        return fold_current(self.pre_sources)


def plan_of(conv: nn.Conv2d) -> EvalPlan | None:
    """The plan kept with conv's cached fold, if any."""
    kept = kept_with_fold(conv)
    return None if kept is None else kept.get(_PLAN)


def keep(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module | None,
    residual: torch.Tensor | None,
    relu: bool,
    backend: str,
    donate: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    config: ConvConfig,
    chosen: backends.Backend,
    into_residual: bool,
    pre_bn: nn.Module | None = None,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
) -> None:
    """Keeps the full path's decisions for a call it just ran as an eager call without autograd (plain_eager_call:
    the caller's condition), where the plan can hold: without autocast, the residual taken as given (the caller
    checks: neither cast nor broadcast), the cached fold's weight, a prologue's norm (pre_bn, whose in_scale and
    in_shift the call took) made of its own parameters and buffers. into_residual: whether the call may write into
    its residual, where the chosen backend can (donated and writable)."""
    if torch.is_autocast_enabled(x.device.type):
        return
    # Only a cached fold: it is never an inference tensor (folding makes it outside inference mode), so the plan holds
    # inside and outside inference mode alike.
    kept = kept_with_fold(conv)
    sources = fold_sources(conv, bn, weight) if kept is not None else None
    if sources is None:
        return
    prologue = None
    if pre_bn is not None:
        pre_sources = norm_sources(pre_bn)
        if pre_sources is None:
            return
        prologue = (pre_bn, pre_sources, in_scale, in_shift)
    signature = _signature(x, residual, relu, donate, backend)
    kept[_PLAN] = EvalPlan(
        signature, conv, bn, sources, weight, bias, config, chosen, into_residual, x.device.type, prologue
    )
