"""Pieces every model family shares: the input boundary, the weights' layout and torchvision's initialisation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..nn import activation_bounds
from ..nn.folding import FOLDABLE_NORMS
from ..nn.functional import conv_unfusable
from ..nn.hooks import global_forward_hooks, has_hooks, submodules
from ..ops import cpp_backend
from ..ops.checks import check_activation


def prepare_input(x: torch.Tensor, stem: nn.Module) -> torch.Tensor:
    """Checks a model's input against its stem (the module that takes it first) and converts it to channels_last,
    once for the whole network (the fused kernels work in NHWC; converting per layer would cost a memory pass each).
    A stem that is not a conv (a "deep stem" nn.Sequential a user put in its place) checks its input itself."""
    check_activation(x)
    in_channels = getattr(stem, "in_channels", None)
    if isinstance(in_channels, int) and x.shape[1] != in_channels:
        raise ValueError(f"input must have {in_channels} channels (N, {in_channels}, H, W), got shape {tuple(x.shape)}")
    return x.contiguous(memory_format=torch.channels_last)


# The torch modules a fused model is built of, besides the package's own (models/): with only these inside, and no
# hooks, nothing of the user's runs between its convs.
_STOCK_PARTS = (
    nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Sequential, nn.Identity, *FOLDABLE_NORMS
)  # fmt: skip


def _only_own_parts(model: nn.Module) -> bool:
    if global_forward_hooks():
        return False
    for m in submodules(model):
        kind = type(m)
        if has_hooks(m) or not (kind in _STOCK_PARTS or kind.__module__.startswith("fused_resnet.models.")):
            return False
        # Every conv and BN one fused eval call (whose parameters the extension checks): the types are exact here.
        if (kind is nn.Conv2d and conv_unfusable(m)) or (kind in FOLDABLE_NORMS and m.training):
            return False
    return True


def forward_checked(model: nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """body(x): a fused model's forward from its prepared input. Where x is a finite CPU tensor of 32 or 16 bits
    (not fp16, whose activations overflow to infinities at 65504) and nothing of the user's runs inside the model, the
    CPU conv's NaN scans are off meanwhile (csrc/cpu/input_scans.h), under bounds on the activations' magnitudes
    that show them finite (nn/activation_bounds.py: where a bound may overflow, the scans go back on)."""
    previous = None
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)
    if not traced and x.device.type == "cpu" and cpp_backend.has_cpu_input_scans():
        half = x.dtype == torch.float16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        )
        if not half and x.is_floating_point() and _only_own_parts(model):
            largest = activation_bounds.largest_magnitude(x)  # NaN or infinite where any value is
            if largest <= activation_bounds.LIMIT:
                previous = cpp_backend.set_cpu_input_scans(False), activation_bounds.begin(x, largest)
    if previous is None:
        return body(x)
    try:
        return body(x)
    finally:
        cpp_backend.set_cpu_input_scans(previous[0])
        activation_bounds.end(previous[1])


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convs (fan_out), BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def set_conv_layout(modules: Iterable[nn.Module], memory_format: torch.memory_format) -> None:
    """Stores the conv weights inside `modules` in `memory_format`, in place (the same Parameter objects), each conv
    once. Fused models keep them channels_last, as the activations are: in training the stock conv (oneDNN,
    cuDNN) would otherwise convert each weight and its gradient on every call (measured on CPU: ResNet-50 train
    step 6 % faster, ResNet-18 10 %)."""
    convs = {id(m): m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)}
    for conv in convs.values():
        conv.to(memory_format=memory_format)
