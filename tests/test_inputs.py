"""Bad inputs raise errors that name the problem; edge inputs give correct results."""

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.check import randomize_bn_
from fused_resnet.tolerances import relative_error


@pytest.fixture(scope="module")
def pair():
    reference = randomize_bn_(torchvision.models.resnet18(num_classes=10)).double().eval()
    return reference, fused_resnet.fuse(reference)


def test_bad_inputs(pair):
    _, model = pair
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="must have 3 channels.*got shape \\(1, 4, 32, 32\\)"):
        model(torch.randn(1, 4, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="does not match"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="is on meta but the model's parameters are on cpu"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1.0]])


def test_empty_batch(pair):
    _, model = pair
    with torch.no_grad():
        out = model(torch.randn(0, 3, 32, 32, dtype=torch.float64))
    assert out.shape == (0, 10)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "nchw"])
def test_memory_formats(pair, layout):
    reference, model = pair
    x = torch.randn(2, 3, 40, 72, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = x[:, :, :, ::2]
        assert not x.is_contiguous()
    with torch.no_grad():
        assert relative_error(model(x), reference(x.contiguous())) <= 1e-12
