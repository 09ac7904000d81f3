"""Pre-activation ResNets for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks"), fused.

depth = 9n + 2: a 3×3 conv (3 → 16, no BN after it), three stages of n pre-activation bottlenecks with
64/128/256 output channels (planes 16/32/64, expansion 4; stride 2 at the start of stages 2 and 3), a final
BN + ReLU, global average pooling and a 256 → num_classes linear layer. preact_resnet164 has n = 18,
preact_resnet1001 n = 111.

A block is bn1 → relu → conv1 (1×1) → bn2 → relu → conv2 (3×3, stride) → bn3 → relu → conv3 (1×1), plus the
shortcut: the identity, or where the shape changes a 1×1 conv with stride (`downsample`, no BN after it)
applied to the pre-activated input relu(bn1(x)), as in He et al.'s reference code. The stride sits on the 3×3
conv, as in torchvision's Bottleneck. He et al. describe the network's first pre-activation as applied to
conv1's output; here that is simply the first block's bn1 + ReLU, so every block has the same structure and
conv1 has no BN of its own.

Fused calls per block: BN + ReLU before a conv is the conv's prologue (`pre_bn`), BN + ReLU after it the
epilogue, and the residual add is fused into conv3:
    out = conv_bn_act(x, conv1, bn2, relu=True, pre_bn=bn1)
    out = conv_bn_act(out, conv2, bn3, relu=True)
    out = conv_bn_act(out, conv3, None, residual=x or conv_bn_act(x, downsample, None, pre_bn=bn1), relu=False)

state_dict layout (these nets have no torchvision twin), in this order. S = 1, 2, 3 is the stage, B = 0 … n−1
the block, p the stage's planes and cin the block's input channels:
    stage S     p    4p    cin of block 0    cin of blocks 1 … n−1
    layer1     16    64    16                64
    layer2     32   128    64                128
    layer3     64   256    128               256
Every BN `X` has X.weight, X.bias, X.running_mean, X.running_var of shape [C] and X.num_batches_tracked [].
    conv1.weight                  [16, 3, 3, 3]
    layerS.B.bn1.*                [cin]
    layerS.B.conv1.weight         [p, cin, 1, 1]
    layerS.B.bn2.*                [p]
    layerS.B.conv2.weight         [p, p, 3, 3]
    layerS.B.bn3.*                [p]
    layerS.B.conv3.weight         [4p, p, 1, 1]
    layerS.0.downsample.weight    [4p, cin, 1, 1]    (first block of each stage only)
    bn_final.*                    [256]
    fc.weight                     [num_classes, 256]
    fc.bias                       [num_classes]
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import requested_backend
from ..nn.functional import bn_act, conv_bn_act, uses_batch_stats
from ._common import forward_checked, init_weights, prepare_input, set_conv_layout
from ._layers import ResidualLayer
from ._weights import Weights, load_weights
from .resnet import conv1x1, conv3x3

# torch.fx.symbolic_trace (torchvision's create_feature_extractor) records each call of these as it is, the modules
# as arguments, instead of tracing into the checks and folds they make on real tensors.
torch.fx.wrap("prepare_input")
torch.fx.wrap("conv_bn_act")
torch.fx.wrap("bn_act")

__all__ = ["PreActBottleneck", "PreActResNet", "preact_resnet164", "preact_resnet1001"]


class PreActBottleneck(nn.Module):
    """BN → ReLU → conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1 → + shortcut, as three fused calls."""

    expansion: int = 4
    takes_donated_input = True  # forward(x, donate_x=True): see models/_layers.py

    def __init__(self, inplanes: int, planes: int, stride: int = 1, backend: str = "auto") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample: nn.Conv2d | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = conv1x1(inplanes, planes * self.expansion, stride)
        self.backend = backend

    def forward(self, x: torch.Tensor, donate_x: bool = False) -> torch.Tensor:
        pre, pre_bn = x, self.bn1
        if uses_batch_stats(self.bn1):
            # Batch statistics (and the running-stat update) must happen once, though two convs read bn1's output.
            pre, pre_bn = bn_act(x, self.bn1, relu=True, backend=self.backend), None

        if self.downsample is not None:
            shortcut, donate = (
                conv_bn_act(pre, self.downsample, None, relu=False, backend=self.backend, pre_bn=pre_bn),
                True,
            )
        else:
            shortcut, donate = x, donate_x

        out = conv_bn_act(pre, self.conv1, self.bn2, relu=True, backend=self.backend, pre_bn=pre_bn)
        out = conv_bn_act(out, self.conv2, self.bn3, relu=True, backend=self.backend)
        out = conv_bn_act(
            out, self.conv3, None, residual=shortcut, relu=False, backend=self.backend, donate_residual=donate
        )
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class PreActResNet(nn.Module):
    """A pre-activation bottleneck ResNet for CIFAR of depth 9·n + 2 with `n = blocks_per_stage`."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, backend: str = "auto") -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, got {blocks_per_stage}")
        requested_backend(backend)  # refuses unknown names now rather than at the first forward
        self.backend = backend
        self.inplanes = 16

        self.conv1 = conv3x3(3, 16)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.bn_final = nn.BatchNorm2d(64 * PreActBottleneck.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64 * PreActBottleneck.expansion, num_classes)
        init_weights(self)
        set_conv_layout([self], torch.channels_last)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBottleneck(self.inplanes, planes, stride, self.backend)]
        self.inplanes = planes * PreActBottleneck.expansion
        layers += [PreActBottleneck(self.inplanes, planes, 1, self.backend) for _ in range(1, blocks)]
        return ResidualLayer(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_checked(self, prepare_input(x, self.conv1), self._forward_impl)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_act(x, self.conv1, None, relu=False, backend=self.backend)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = bn_act(x, self.bn_final, relu=True, backend=self.backend)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _preact_resnet(depth: int, *, num_classes: int, backend: str, weights: Weights) -> PreActResNet:
    model = PreActResNet((depth - 2) // 9, num_classes=num_classes, backend=backend)
    return load_weights(model, weights)


def preact_resnet164(*, num_classes: int = 10, backend: str = "auto", weights: Weights = None) -> PreActResNet:
    """Pre-activation ResNet-164 for 32×32 images (n = 18, ~1.7M parameters)."""
    return _preact_resnet(164, num_classes=num_classes, backend=backend, weights=weights)


def preact_resnet1001(*, num_classes: int = 10, backend: str = "auto", weights: Weights = None) -> PreActResNet:
    """Pre-activation ResNet-1001 for 32×32 images (n = 111, ~10.3M parameters)."""
    return _preact_resnet(1001, num_classes=num_classes, backend=backend, weights=weights)
