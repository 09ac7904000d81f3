"""fuse(): a torchvision ResNet → the fused model; unfuse(): back. Conversion re-types the modules in place
of a (deep) copy: fused and torchvision classes have the same attributes, so weights, buffers, training mode,
device and dtype carry over untouched. Structures that are not recognised are left as they are and reported.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import backends
from .models import resnet as fused
from .models._common import set_conv_layout
from .models._layers import ResidualLayer, StemMaxPool2d
from .nn.conv_bn_act import ConvBNAct
from .nn.folding import clear_fold_cache


@functools.cache
def _to_fused() -> dict[type, type]:
    # torchvision is needed only to convert its models: import it here, not when fused_resnet is imported.
    import torchvision.models.resnet as tv

    return {tv.BasicBlock: fused.BasicBlock, tv.Bottleneck: fused.Bottleneck, tv.ResNet: fused.ResNet}


def _to_torchvision() -> dict[type, type]:
    return {v: k for k, v in _to_fused().items()}


_CONV_BN_PAIRS = {
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "ResNet": (("conv1", "bn1"),),
}


class FuseWarning(UserWarning):
    """Part of a model was left unconverted."""


@dataclass(frozen=True)
class Skipped:
    name: str
    type_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name or '<model>'} ({self.type_name}): {self.reason}"


def _unfusable_reason(module: nn.Module) -> str | None:
    for conv_name, bn_name in _CONV_BN_PAIRS[type(module).__name__]:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if type(conv) is not nn.Conv2d or conv.bias is not None or conv.padding_mode != "zeros":
            return f"{conv_name} is not a bias-free zero-padded nn.Conv2d ({type(conv).__name__})"
        if type(bn) not in fused.SUPPORTED_NORMS:
            return f"{bn_name} is {type(bn).__name__}, not BatchNorm2d/FrozenBatchNorm2d"
    relu = getattr(module, "relu", None)
    if type(relu) is not nn.ReLU:  # the fused kernels apply ReLU itself
        return f"relu is {type(relu).__name__}, not nn.ReLU"
    return None


def _convert(model: nn.Module, mapping: dict[type, type], lookalikes: tuple[type, ...]) -> list[Skipped]:
    skipped = []
    for name, module in model.named_modules():
        target = mapping.get(type(module))
        if target is None:
            if isinstance(module, lookalikes):
                skipped.append(Skipped(name, type(module).__name__, "a subclass with its own code; left as is"))
            continue
        reason = _unfusable_reason(module)
        if reason is not None:
            skipped.append(Skipped(name, type(module).__name__, reason))
            continue
        module.__class__ = target
    return skipped


def fuse(model: nn.Module, backend: str = "auto", inplace: bool = False, strict: bool = False) -> nn.Module:
    """Converts every torchvision ResNet / BasicBlock / Bottleneck inside `model` to its fused twin.

    Outputs are the same (up to the fused kernels' rounding); state_dict keys and values do not change. Returns a
    converted deep copy, its conv weights stored channels_last as the fused kernels run, unless inplace=True: then
    the model itself, its parameters untouched (an optimizer's state may depend on their layout). Anything ResNet-
    like that cannot be converted (a subclass with custom code, a block with another norm layer, a conv with bias)
    is left untouched and reported with a FuseWarning, or a ValueError when strict=True. A model with nothing to
    convert is an error.
    """
    backends.requested_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    skipped = _convert(model, _to_fused(), tuple(_to_fused()))
    _retype_layers(model, to_fused=True)
    converted = [m for m in model.modules() if type(m) in _to_torchvision()]
    if not inplace:  # in place, a live optimizer's state may pair elements by memory position (fused Adam does)
        set_conv_layout(converted, torch.channels_last)
    _report(skipped, strict, "fuse")
    if not converted:
        why = f"; every one found was left as it was: {'; '.join(map(str, skipped))}" if skipped else ""
        name = type(model).__name__
        raise ValueError(f"fuse() converted no torchvision ResNet, BasicBlock or Bottleneck in {name}{why}")
    set_backend(model, backend)
    return model


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of fuse(): fused ResNets/blocks become torchvision's classes again (same parameter values; in a
    copy, conv weights in the default contiguous layout)."""
    if not inplace:
        model = copy.deepcopy(model)
    skipped = _convert(model, _to_torchvision(), tuple(_to_torchvision()))
    _retype_layers(model, to_fused=False)
    _report(skipped, strict=False, verb="unfuse")
    converted = [m for m in model.modules() if type(m) in _to_fused()]
    for module in converted:
        module.__dict__.pop("backend", None)
        module.__dict__.pop("_block_kwargs", None)
    if not inplace:  # torchvision's default layout (as for fuse: in place, parameters stay as they are)
        set_conv_layout(converted, torch.contiguous_format)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            clear_fold_cache(module)
    return model


def _retype_layers(model: nn.Module, to_fused: bool) -> None:
    # A fused ResNet's stages are ResidualLayers (models/_layers.py: blocks may reuse a dead input's memory) and its
    # max-pool a StemMaxPool2d (remade input in backward); only these five children of a converted ResNet change,
    # never other nn.Sequentials (downsample, user code) or pools.
    retyped = {"layer1": ResidualLayer, "layer2": ResidualLayer, "layer3": ResidualLayer, "layer4": ResidualLayer}
    retyped["maxpool"] = StemMaxPool2d
    for module in model.modules():
        if to_fused and type(module) is fused.ResNet:
            for name, fused_type in retyped.items():
                child = getattr(module, name, None)
                if type(child) is fused_type.__base__:
                    child.__class__ = fused_type
        elif not to_fused and type(module) in (ResidualLayer, StemMaxPool2d):
            module.__class__ = type(module).__base__


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Sets the backend ("auto", "reference", "triton", "cuda", "cpu") on every fused module of `model`."""
    backends.requested_backend(backend)
    for module in model.modules():
        if isinstance(module, ConvBNAct) or type(module).__module__.startswith("fused_resnet.models."):
            module.backend = backend
    return model


def _report(skipped: list[Skipped], strict: bool, verb: str) -> None:
    if not skipped:
        return
    lines = "\n  ".join(map(str, skipped))
    message = f"{verb}() left {len(skipped)} module(s) unconverted:\n  {lines}"
    if strict:
        raise ValueError(message)
    warnings.warn(message, FuseWarning, stacklevel=3)
