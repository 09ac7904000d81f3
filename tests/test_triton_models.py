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


def _strict_fp32():
    # The interpreter's fp32 dot is exact; on a GPU, compare without TF32 so the 1e-5 bound is meaningful.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_model_eval(name):
    _strict_fp32()
    reference = randomize_bn_(getattr(torchvision.models, name)(num_classes=10)).eval().to(DEVICE)
    fused = fused_resnet.fuse(reference, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert relative_error(fused(x), reference(x)) <= 1e-5


def test_preact_prologue_model_eval():
    _strict_fp32()
    torch.manual_seed(0)
    model = randomize_bn_(fused_resnet.preact_resnet164()).eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = fused_resnet.set_backend(model, "reference")(x)
        got = fused_resnet.set_backend(model, "triton")(x)
    assert relative_error(got, expected) <= 1e-5
