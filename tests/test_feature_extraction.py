"""torch.fx symbolic tracing of the fused models (torchvision's create_feature_extractor, a detection or segmentation
backbone's usual entry): the traced graph calls the fused ops with the modules as arguments, and its features match
torchvision's own feature extractor over the same weights (an audit found tracing refused: the input check saw a
Proxy)."""

import pytest
import torch
import torchvision
from torch import fx
from torchvision.models.feature_extraction import create_feature_extractor

import fused_resnet
from fused_resnet.check import randomize_bn_
from fused_resnet.tolerances import relative_error

NODES = {"layer1": "c2", "layer2.0": "block", "layer3": "c4", "layer4": "c5", "fc": "logits"}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_create_feature_extractor_matches_torchvision(name, training):
    torch.manual_seed(0)
    tv = randomize_bn_(getattr(torchvision.models, name)(num_classes=10)).double()
    fused = fused_resnet.fuse(tv)
    mode = fused.training
    want_model = create_feature_extractor(tv, NODES).train(training)
    got_model = create_feature_extractor(fused, NODES).train(training)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want, got = want_model(x), got_model(x)
    assert got.keys() == want.keys()
    for key in want:
        assert relative_error(got[key], want[key]) < 1e-10, key
    # create_feature_extractor leaves the model as it found it.
    assert fused.training == mode


@pytest.mark.parametrize(
    "build",
    [lambda: fused_resnet.resnet20(option="B"), lambda: fused_resnet.preact_resnet164()],
    ids=["cifar", "preact"],
)
def test_symbolic_trace_of_the_other_families_runs_as_the_model(build):
    torch.manual_seed(0)
    model = randomize_bn_(build()).double().eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(traced(x), model(x)) < 1e-12
