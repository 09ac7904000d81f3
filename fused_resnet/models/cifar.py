"""CIFAR ResNets of He et al. 2015 ("Deep Residual Learning for Image Recognition", §4.2), fused.

depth = 6n + 2: a 3×3 conv (3 → 16) + BN + ReLU, three stages of n BasicBlocks with 16/32/64 channels
(stride 2 at the start of stages 2 and 3), global average pooling and a 64 → num_classes linear layer.

Shortcuts where the shape changes:
- option "A" (the paper's CIFAR choice, parameter-free): subsample x[:, :, ::2, ::2] and append zero channels;
- option "B": a 1×1 conv with stride + BN projection, stored as `downsample.0` / `downsample.1` like torchvision.

Module names follow torchvision (`conv1`, `bn1`, `layer1..3`, blocks with `conv1`, `bn1`, `conv2`, `bn2`,
`downsample`, then `avgpool`, `fc`), so a state dict of a plain PyTorch CIFAR ResNet with these names loads
as is. Each conv → BN (→ + shortcut) → ReLU runs as one `conv_bn_act` call.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import requested_backend
from ..nn.functional import conv_bn_act
from ._common import forward_checked, init_weights, prepare_input, set_conv_layout
from ._layers import ResidualLayer
from ._weights import Weights, load_weights
from .resnet import block_end, conv1x1, conv3x3

# torch.fx.symbolic_trace (torchvision's create_feature_extractor) records each call of these as it is, the modules
# as arguments, instead of tracing into the checks and folds they make on real tensors.
torch.fx.wrap("prepare_input")
torch.fx.wrap("conv_bn_act")

__all__ = [
    "CifarBasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
]

ShortcutOption = Literal["A", "B"]


def _subsample_zero_pad(x: torch.Tensor, stride: int, inplanes: int, planes: int) -> torch.Tensor:
    """Option A shortcut: x itself (of `inplanes` channels), or x subsampled by `stride` with zero channels appended
    up to `planes` (the channel counts are the block's, not read from x, which fx.symbolic_trace cannot branch on)."""
    if stride == 1 and inplanes == planes:
        return x
    x = x[:, :, ::stride, ::stride]
    # Zeros after the identity channels, as in the Torch CIFAR code of the paper (Concat(Identity, MulConstant(0))).
    x = F.pad(x, (0, 0, 0, 0, 0, planes - inplanes))
    return x.contiguous(memory_format=torch.channels_last)


class CifarBasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN → + shortcut → ReLU, as two fused calls."""

    expansion: int = 1
    takes_donated_input = True  # forward(x, donate_x=True): see models/_layers.py

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        option: ShortcutOption = "A",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if option == "B" and (stride != 1 or inplanes != planes):
            self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        self.stride = stride
        self.inplanes = inplanes
        self.planes = planes
        self.backend = backend

    def forward(self, x: torch.Tensor, donate_x: bool = False) -> torch.Tensor:
        if self.downsample is not None:  # option B: the projection, as the torchvision blocks make it
            finish = block_end(x, self.conv2, self.bn2, self.downsample, self.backend)
            return finish(conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend))
        shortcut = _subsample_zero_pad(x, self.stride, self.inplanes, self.planes)
        # The shortcut may take the output unless it is x itself and the caller still needs x.
        donate = donate_x or shortcut is not x

        out = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        out = conv_bn_act(
            out, self.conv2, self.bn2, residual=shortcut, relu=True, backend=self.backend, donate_residual=donate
        )
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth 6·n + 2 with `n = blocks_per_stage`."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        option: ShortcutOption = "A",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if option not in ("A", "B"):
            raise ValueError(f"option must be 'A' (zero-padding shortcut) or 'B' (projection), got {option!r}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, got {blocks_per_stage}")
        requested_backend(backend)  # refuses unknown names now rather than at the first forward
        self.option = option
        self.backend = backend
        self.inplanes = 16

        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64 * CifarBasicBlock.expansion, num_classes)
        init_weights(self)
        set_conv_layout([self], torch.channels_last)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlock(self.inplanes, planes, stride, self.option, self.backend)]
        self.inplanes = planes * CifarBasicBlock.expansion
        layers += [CifarBasicBlock(self.inplanes, planes, 1, self.option, self.backend) for _ in range(1, blocks)]
        return ResidualLayer(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_checked(self, prepare_input(x, self.conv1), self._forward_impl)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        return f"option={self.option!r}, backend={self.backend!r}"


def _cifar_resnet(
    depth: int, *, num_classes: int, option: ShortcutOption, backend: str, weights: Weights
) -> CifarResNet:
    model = CifarResNet((depth - 2) // 6, num_classes=num_classes, option=option, backend=backend)
    return load_weights(model, weights)


def resnet20(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-20 for 32×32 images (n = 3, ~0.27M parameters with option A)."""
    return _cifar_resnet(20, num_classes=num_classes, option=option, backend=backend, weights=weights)


def resnet32(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-32 for 32×32 images (n = 5, ~0.46M parameters with option A)."""
    return _cifar_resnet(32, num_classes=num_classes, option=option, backend=backend, weights=weights)


def resnet44(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-44 for 32×32 images (n = 7, ~0.66M parameters with option A)."""
    return _cifar_resnet(44, num_classes=num_classes, option=option, backend=backend, weights=weights)


def resnet56(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-56 for 32×32 images (n = 9, ~0.85M parameters with option A)."""
    return _cifar_resnet(56, num_classes=num_classes, option=option, backend=backend, weights=weights)


def resnet110(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-110 for 32×32 images (n = 18, ~1.7M parameters with option A)."""
    return _cifar_resnet(110, num_classes=num_classes, option=option, backend=backend, weights=weights)


def resnet1202(
    *, num_classes: int = 10, option: ShortcutOption = "A", backend: str = "auto", weights: Weights = None
) -> CifarResNet:
    """ResNet-1202 for 32×32 images (n = 200, ~19.4M parameters with option A)."""
    return _cifar_resnet(1202, num_classes=num_classes, option=option, backend=backend, weights=weights)
