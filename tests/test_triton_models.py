"""Whole networks on the Triton backend (eval) against torchvision / the reference backend.

Without a GPU these run the kernels in the Triton interpreter, so shapes stay tiny (1×3×32×32)."""

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import backends
from fused_resnet.check import randomize_bn_
from fused_resnet.tolerances import relative_error

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=f"triton backend: {backends.unavailable_reason('triton')}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _strict_fp32(monkeypatch):
    # The interpreter's fp32 dot is exact; on a GPU, compare without TF32 (which the Triton kernel follows,
    # like cuDNN) so the 1e-5 bound is meaningful. cuBLAS (the fc layer) does not use TF32 by default.
    # monkeypatch restores the flags: other tests rely on the TF32 default.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_model_eval(name):
    reference = randomize_bn_(getattr(torchvision.models, name)(num_classes=10)).eval().to(DEVICE)
    fused = fused_resnet.fuse(reference, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert relative_error(fused(x), reference(x)) <= 1e-5


def test_preact_prologue_model_eval():
    torch.manual_seed(0)
    model = randomize_bn_(fused_resnet.preact_resnet164()).eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = fused_resnet.set_backend(model, "reference")(x)
        got = fused_resnet.set_backend(model, "triton")(x)
    assert relative_error(got, expected) <= 1e-5
