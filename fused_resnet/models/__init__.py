"""Model builders: torchvision's ResNet family (fused), CIFAR ResNets and pre-activation ResNets."""

from .cifar import CifarBasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202
from .preact import PreActBottleneck, PreActResNet, preact_resnet164, preact_resnet1001
from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from .resnet import __all__ as _resnet_names

# The builders that have a torchvision twin (and so work with fuse/unfuse and the parity report).
TORCHVISION_BUILDERS = tuple(name for name in _resnet_names if name[0].islower())

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "TORCHVISION_BUILDERS",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "CifarBasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "PreActBottleneck",
    "PreActResNet",
    "preact_resnet164",
    "preact_resnet1001",
]
