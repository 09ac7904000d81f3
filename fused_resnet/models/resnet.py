"""torchvision's ResNet family with conv + BN + [residual] + ReLU fused: same constructors, attribute names and
state_dict keys as torchvision.models.resnet, so torchvision checkpoints load strictly.

Each conv/BN pair stays a plain nn.Conv2d / nn.BatchNorm2d child (that is what keeps the keys); the blocks'
forward hands the pair to the fused functional instead of calling them one by one; a pair where either has hooks
(or while global module hooks exist) runs the two modules' own forwards, so that the hooks fire (nn/functional.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.functional import conv_bn_act, conv_bn_projection_act, has_hooks, projection_trains_fused
from ._common import forward_checked, init_weights, prepare_input, set_conv_layout
from ._layers import ResidualLayer, StemMaxPool2d, fx_symbolic_tracing
from ._weights import Weights, load_weights

# torch.fx.symbolic_trace (torchvision's create_feature_extractor) records each call of these as it is, the modules
# as arguments, instead of tracing into the checks and folds they make on real tensors.
torch.fx.wrap("prepare_input")
torch.fx.wrap("conv_bn_act")
torch.fx.wrap("conv_bn_projection_act")


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
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
]

try:  # torchvision is optional for the models themselves; its FrozenBatchNorm2d is accepted where present
    from torchvision.ops.misc import FrozenBatchNorm2d

    SUPPORTED_NORMS: tuple[type, ...] = (nn.BatchNorm2d, FrozenBatchNorm2d)
except ImportError:
    SUPPORTED_NORMS = (nn.BatchNorm2d,)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _checked_norm_layer(norm_layer: Callable[..., nn.Module] | None) -> Callable[..., nn.Module]:
    if norm_layer is None:
        return nn.BatchNorm2d
    probe = norm_layer(4)
    if type(probe) not in SUPPORTED_NORMS:
        raise ValueError(
            f"norm_layer must build nn.BatchNorm2d or torchvision's FrozenBatchNorm2d (they fold into the conv), "
            f"got {type(probe).__name__}; use torchvision.models for other norms"
        )
    return norm_layer


def shortcut(x: Tensor, downsample: nn.Module | None, backend: str, donate_x: bool = False) -> tuple[Tensor, bool]:
    """The identity, or the projection conv1x1 + BN fused (any other downsample module is simply called), and
    whether the block may write its output into it: a projection's fresh output, or x where the caller donates it.
    """
    if downsample is None:
        return x, donate_x
    if _is_conv_bn(downsample):
        return conv_bn_act(x, downsample[0], downsample[1], relu=False, backend=backend), True
    return downsample(x), False  # a module of the user's: its output may share memory with x or be kept


def block_end(
    x: Tensor, conv: nn.Conv2d, bn: nn.Module, downsample: nn.Module | None, backend: str, donate_x: bool = False,
    act: nn.Module | None = None,
) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """The block's last step, out -> relu(bn(conv(out)) + shortcut(x)), with the shortcut made now (before the
    block's convs, as torchvision orders them); except a projection (conv1x1 + BN) that trains fused with the block's
    last BN: then one unit makes both at the end, applying both BNs in its one pass (conv_bn_projection_act)."""
    if _is_conv_bn(downsample) and projection_trains_fused(bn, downsample[1], backend):
        return lambda out: conv_bn_projection_act(out, conv, bn, x, downsample[0], downsample[1], backend, act=act)
    identity, donate = shortcut(x, downsample, backend, donate_x)
    # A symbolic trace records the call as made: the graph may return the projection's output as a feature.
    donate = donate and not fx_symbolic_tracing()
    return lambda out: conv_bn_act(
        out, conv, bn, residual=identity, relu=True, backend=backend, donate_residual=donate, act=act
    )


def _is_conv_bn(module: nn.Module | None) -> bool:
    # Exactly an nn.Sequential without hooks: a subclass may override forward, and hooks expect to see it run.
    return (
        type(module) is nn.Sequential
        and not has_hooks(module)
        and len(module) == 2
        and type(module[0]) is nn.Conv2d
        and module[0].bias is None
        and type(module[1]) in SUPPORTED_NORMS
    )


class BasicBlock(nn.Module):
    expansion: int = 1
    takes_donated_input = True  # forward(x, donate_x=True): see models/_layers.py

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        norm_layer = _checked_norm_layer(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.backend = backend

    def forward(self, x: Tensor, donate_x: bool = False) -> Tensor:
        finish = block_end(x, self.conv2, self.bn2, self.downsample, self.backend, donate_x, self.relu)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend, act=self.relu)
        return finish(out)  # the residual add and the block's final ReLU run in conv2's epilogue


class Bottleneck(nn.Module):
    # torchvision (ResNet V1.5) puts the stride on the 3x3 conv2; the original paper (V1) on the 1x1 conv1,
    # available as stride_in_1x1=True. https://ngc.nvidia.com/catalog/model-scripts/nvidia:resnet_50_v1_5_for_pytorch
    expansion: int = 4
    takes_donated_input = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str = "auto",
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = _checked_norm_layer(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend = backend

    def forward(self, x: Tensor, donate_x: bool = False) -> Tensor:
        finish = block_end(x, self.conv3, self.bn3, self.downsample, self.backend, donate_x, self.relu)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend, act=self.relu)
        out = conv_bn_act(out, self.conv2, self.bn2, relu=True, backend=self.backend, act=self.relu)
        return finish(out)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str = "auto",
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        self._norm_layer = _checked_norm_layer(norm_layer)
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError("stride_in_1x1=True applies to Bottleneck networks (ResNet-50 and deeper) only")
        self._block_kwargs: dict[str, Any] = {"backend": backend}
        if block is Bottleneck:
            self._block_kwargs["stride_in_1x1"] = stride_in_1x1
        self.backend = backend

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = StemMaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_weights(self)
        set_conv_layout([self], torch.channels_last)

        # Zero-initialize the last BN in each residual branch, so that the residual branch starts with zeros and
        # each residual block behaves like an identity (+0.2~0.3% top-1, https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                previous_dilation,
                norm_layer,
                **self._block_kwargs,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                    **self._block_kwargs,
                )
            )
        return ResidualLayer(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return forward_checked(self, prepare_input(x, self.conv1), self._forward_impl)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend, act=self.relu)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    weights: Weights,
    progress: bool,
    **kwargs: Any,
) -> ResNet:
    # progress is accepted for torchvision compatibility; nothing is ever downloaded.
    model = ResNet(block, layers, **kwargs)
    return load_weights(model, weights)


def resnet18(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__.

    weights: a state dict (e.g. torchvision's ``resnet18(weights=...).state_dict()``) or a path to one.
    """
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34; see :func:`resnet18` for ``weights``."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (V1.5: stride on the 3x3; ``stride_in_1x1=True`` for V1); see :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101; see :func:`resnet50`."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152; see :func:`resnet50`."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def _grouped(kwargs: dict[str, Any], groups: int, width_per_group: int) -> dict[str, Any]:
    for name, value in (("groups", groups), ("width_per_group", width_per_group)):
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"this builder fixes {name}={value}, got {kwargs[name]}")
    return {**kwargs, "groups": groups, "width_per_group": width_per_group}


def resnext50_32x4d(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d from `Aggregated Residual Transformation <https://arxiv.org/abs/1611.05431>`__."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **_grouped(kwargs, 32, 4))


def resnext101_32x8d(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **_grouped(kwargs, 32, 8))


def resnext101_64x4d(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **_grouped(kwargs, 64, 4))


def wide_resnet50_2(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 from `Wide Residual Networks <https://arxiv.org/abs/1605.07146>`__."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **_grouped(kwargs, 1, 64 * 2))


def wide_resnet101_2(*, weights: Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **_grouped(kwargs, 1, 64 * 2))
