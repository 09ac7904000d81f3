"""ConvBNAct: Conv2d (no bias) + BatchNorm2d + optional residual add + optional ReLU as one module."""

from __future__ import annotations

import torch
from torch import nn

from .functional import conv_bn_act


class ConvBNAct(nn.Module):
    """act(bn(conv(x)) + residual), run as one fused op.

    Children are a plain `conv` (nn.Conv2d, bias=False) and `bn` (nn.BatchNorm2d), so state_dict keys are
    `conv.weight`, `bn.weight`, `bn.running_mean`, … In eval mode BN is folded into the conv (cached until a
    parameter or buffer changes); in train mode BN uses batch statistics and updates its running stats like
    nn.BatchNorm2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        relu: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, backend: str = "auto") -> ConvBNAct:
        """Wraps existing modules (shared, not copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv, module.bn, module.relu, module.backend = conv, bn, relu, backend
        return module

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self.bn, residual, self.relu, self.backend)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"
