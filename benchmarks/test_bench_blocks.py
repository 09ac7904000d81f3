"""Per block: torchvision's BasicBlock/Bottleneck (with and without a downsample) vs the same block fused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from bench_utils import DEVICE, DTYPE, ON_GPU, fused_backends
from torch import nn

import fused_resnet
from fused_resnet.tolerances import forward_rtol, relative_error

# (name, block class, inplanes, planes, stride, H=W)
SIZE, BATCH = (56, 32) if ON_GPU else (16, 2)
BLOCKS = [
    ("basic", torchvision.models.resnet.BasicBlock, 64, 64, 1, SIZE),
    ("basic_downsample", torchvision.models.resnet.BasicBlock, 64, 128, 2, SIZE),
    ("bottleneck", torchvision.models.resnet.Bottleneck, 256, 64, 1, SIZE),
    ("bottleneck_downsample", torchvision.models.resnet.Bottleneck, 256, 128, 2, SIZE),
]


def _block(case: tuple) -> tuple[nn.Module, torch.Tensor]:
    _, cls, inplanes, planes, stride, size = case
    downsample = None
    if stride != 1 or inplanes != planes * cls.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * cls.expansion)
        )
    block = cls(inplanes, planes, stride, downsample)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    block = block.to(DEVICE, DTYPE, memory_format=torch.channels_last).eval()
    x = torch.randn(BATCH, inplanes, size, size, device=DEVICE, dtype=DTYPE)
    return block, x.contiguous(memory_format=torch.channels_last)


def _info(case: tuple, impl: str, backend: str) -> dict[str, Any]:
    name, _, inplanes, planes, stride, size = case
    return dict(
        impl=impl,
        block=name,
        backend=backend,
        dtype=DTYPE,
        batch=BATCH,
        shape=f"{inplanes}x{size}x{size} planes={planes} stride={stride}",
        memory_format="channels_last",
    )


@pytest.mark.parametrize("case", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_torchvision_block(timed: Any, case: tuple) -> None:
    block, x = _block(case)
    timed(lambda: block(x), **_info(case, "torchvision", "stock"))


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("case", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_fused_block(timed: Any, case: tuple, backend: str) -> None:
    block, x = _block(case)
    fused = fused_resnet.fuse(block, backend=backend)
    with torch.no_grad():
        err = relative_error(fused(x), block(x))
    assert err <= forward_rtol(DTYPE, DEVICE), f"fused block differs from torchvision by {err:.2e} before timing"
    timed(lambda: fused(x), **_info(case, "fused", backend))
