"""Per fused op: conv_bn_act on each backend vs the stock kernels it replaces (conv, BN, [add], ReLU), and vs
the stock convolution alone (cuDNN on a GPU), over ResNet-50 layer shapes (tiny ones on a CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bench_utils import DEVICE, DTYPE, ON_GPU, fused_backends
from torch import nn

from fused_resnet.nn.functional import conv_bn_act
from fused_resnet.tolerances import forward_rtol, relative_error

# (name, N, Cin, H, W, Cout, kernel, stride, residual, relu)
if ON_GPU:
    SHAPES = [
        ("stem7x7s2", 32, 3, 224, 224, 64, 7, 2, False, True),
        ("l1_3x3", 32, 64, 56, 56, 64, 3, 1, False, True),
        ("l1_1x1_expand_add", 32, 64, 56, 56, 256, 1, 1, True, True),
        ("l1_1x1_reduce", 32, 256, 56, 56, 64, 1, 1, False, True),
        ("l2_shortcut_1x1s2", 32, 256, 56, 56, 512, 1, 2, False, False),
        ("l4_3x3", 32, 512, 7, 7, 512, 3, 1, False, True),
    ]
else:
    SHAPES = [
        ("stem7x7s2", 2, 3, 32, 32, 16, 7, 2, False, True),
        ("3x3", 2, 16, 16, 16, 16, 3, 1, False, True),
        ("1x1_add", 2, 16, 16, 16, 32, 1, 1, True, True),
        ("shortcut_1x1s2", 2, 32, 16, 16, 64, 1, 2, False, False),
    ]


def _layer(shape: tuple) -> tuple[nn.Conv2d, nn.BatchNorm2d, torch.Tensor, torch.Tensor | None]:
    _, n, cin, h, w, cout, k, stride, with_residual, _ = shape
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    conv = conv.to(DEVICE, DTYPE, memory_format=torch.channels_last).eval()
    bn = bn.to(DEVICE, DTYPE).eval()
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    residual = None
    if with_residual:
        oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        residual = torch.randn(n, cout, oh, ow, device=DEVICE, dtype=DTYPE)
        residual = residual.contiguous(memory_format=torch.channels_last)
    return conv, bn, x, residual


def _stock(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> Any:
    y = F.batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _info(shape: tuple, impl: str) -> dict[str, Any]:
    name, n, cin, h, w, cout, k, stride, residual, relu = shape
    return dict(
        impl=impl,
        layer=name,
        dtype=DTYPE,
        batch=n,
        shape=f"{cin}x{h}x{w}->{cout} k{k}s{stride}",
        residual=residual,
        relu=relu,
        memory_format="channels_last",
    )


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_stock_conv_alone(timed: Any, shape: tuple) -> None:
    conv, _, x, _ = _layer(shape)
    timed(lambda: conv(x), **_info(shape, "conv"), backend="stock")


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_stock_conv_bn_act(timed: Any, shape: tuple) -> None:
    conv, bn, x, residual = _layer(shape)
    timed(lambda: _stock(conv, bn, x, residual, shape[-1]), **_info(shape, "conv+bn+add+relu"), backend="stock")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_fused_conv_bn_act(timed: Any, shape: tuple, backend: str) -> None:
    conv, bn, x, residual = _layer(shape)
    relu = shape[-1]

    def fused() -> torch.Tensor:
        return conv_bn_act(x, conv, bn, residual, relu, backend=backend)

    with torch.no_grad():
        err = relative_error(fused(), _stock(conv, bn, x, residual, relu))
    assert err <= forward_rtol(DTYPE, DEVICE), f"fused output differs from stock by {err:.2e} before timing"
    timed(fused, **_info(shape, "conv_bn_act"), backend=backend)
