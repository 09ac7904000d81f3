"""Per model: torchvision ResNet vs the same model fused (GPU: batch 32 at 224x224; CPU: batch 1 at 64x64)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from bench_utils import DEVICE, DTYPE, ON_GPU, fused_backends
from torch import nn

import fused_resnet
from fused_resnet.tolerances import forward_rtol, relative_error

MODELS = ("resnet18", "resnet50")
BATCH, SIZE = (32, 224) if ON_GPU else (1, 64)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model = model.to(DEVICE, DTYPE, memory_format=torch.channels_last).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    return model, x


def _info(name: str, impl: str, backend: str) -> dict[str, Any]:
    return dict(
        model=name, impl=impl, backend=backend, dtype=DTYPE, batch=BATCH, image_size=SIZE, memory_format="channels_last"
    )


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model(timed: Any, name: str) -> None:
    model, x = _model(name)
    timed(lambda: model(x), **_info(name, "torchvision", "stock"))


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("name", MODELS)
def test_fused_model(timed: Any, name: str, backend: str) -> None:
    model, x = _model(name)
    fused = fused_resnet.fuse(model, backend=backend)
    with torch.no_grad():
        err = relative_error(fused(x), model(x))
    assert err <= forward_rtol(DTYPE, DEVICE), f"fused {name} differs from torchvision by {err:.2e} before timing"
    timed(lambda: fused(x), **_info(name, "fused", backend))
