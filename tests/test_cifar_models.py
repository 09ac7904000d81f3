"""CIFAR ResNets (fused_resnet.models.cifar) against a plain PyTorch CIFAR ResNet written here.

The reference uses nn.Conv2d / nn.BatchNorm2d / F.relu with a straight-line forward and its own shortcut code,
and loads the fused model's state dict strictly (same key names). BN parameters and running statistics are
randomised first: default-initialised BN is nearly the identity and would hide wiring bugs. Parity runs through
fused_resnet.check.compare (eval and train forward, input and parameter gradients, running stats, an SGD step;
float64 reference; float32 also judged against stock PyTorch's own float32 error).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_deep_net_trains_and_evaluates
from torch import nn

from fused_resnet.check import compare, randomize_bn_
from fused_resnet.models import cifar

# Model wiring is what is tested here; each backend's op is tested against the reference op on its own.
BACKEND = "reference"
DTYPES = [torch.float32, torch.float64]
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}
# Exact counts; He et al. 2015 Table 6 gives 0.27M, 0.46M, 0.66M, 0.85M, 1.7M and 19.4M for option A.
PARAMS = {
    ("A", 20): 269_722,
    ("A", 32): 464_154,
    ("A", 44): 658_586,
    ("A", 56): 853_018,
    ("A", 110): 1_727_962,
    ("A", 1202): 19_421_274,
    ("B", 20): 272_474,
    ("B", 32): 466_906,
    ("B", 44): 661_338,
    ("B", 56): 855_770,
    ("B", 110): 1_730_714,
    ("B", 1202): 19_424_026,
}
PARITY = [(20, "A"), (20, "B"), (32, "A"), (32, "B")]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ reference
class RefBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, option: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.reshape = stride != 1 or inplanes != planes
        self.stride, self.extra_channels = stride, planes - inplanes
        self.downsample = None
        if option == "B" and self.reshape:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        elif self.reshape:
            sub = x[:, :, :: self.stride, :: self.stride]
            zeros = sub.new_zeros(sub.shape[0], self.extra_channels, sub.shape[2], sub.shape[3])
            shortcut = torch.cat([sub, zeros], dim=1)
        else:
            shortcut = x
        return F.relu(out + shortcut)


class RefCifarResNet(nn.Module):
    def __init__(self, n: int, option: str, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [RefBasicBlock(inplanes, planes, stride, option)]
            blocks += [RefBasicBlock(planes, planes, 1, option) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused model's memory format: the float32 yardstick (stock PyTorch's own error against float64) then
        # comes from the same CPU kernels. NCHW kernels are 2-6x more accurate for conv/BN, and ReLU flips (a
        # pre-activation within rounding of 0 passing or blocking a unit's gradient) would fall elsewhere.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("depth", "option"), PARITY)
def test_parity_with_plain_pytorch(depth: int, option: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    fused = randomize_bn_(getattr(cifar, f"resnet{depth}")(option=option, backend=BACKEND))
    reference = RefCifarResNet(DEPTHS[depth], option)
    reference.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = compare(f"resnet{depth}-{option}", reference, fused, x, dtype)
    assert len(rows) == 6
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(map(str, failed))


def test_channels_last_and_nchw_inputs_agree() -> None:
    model = cifar.resnet20(backend=BACKEND).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("option", ["A", "B"])
@pytest.mark.parametrize("depth", list(DEPTHS))
def test_construction_and_parameter_count(depth: int, option: str) -> None:
    model = getattr(cifar, f"resnet{depth}")(option=option)
    n = DEPTHS[depth]
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[(option, depth)]
    downsampled = [name for name, _ in model.named_modules() if name.endswith("downsample")]
    assert downsampled == ([] if option == "A" else ["layer2.0.downsample", "layer3.0.downsample"])


def _golden_keys(n: int, option: str) -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for stage in (1, 2, 3):
        for block in range(n):
            p = f"layer{stage}.{block}."
            for i in (1, 2):
                keys += [p + f"conv{i}.weight", *(p + f"bn{i}.{s}" for s in bn)]
            if option == "B" and stage > 1 and block == 0:
                keys += [p + "downsample.0.weight", *(p + f"downsample.1.{s}" for s in bn)]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("option", ["A", "B"])
def test_state_dict_keys_are_golden(option: str) -> None:
    state = cifar.resnet20(option=option).state_dict()
    assert list(state) == _golden_keys(3, option)
    shapes = {
        "conv1.weight": (16, 3, 3, 3),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer2.0.conv1.weight": (32, 16, 3, 3),
        "layer2.0.conv2.weight": (32, 32, 3, 3),
        "layer3.2.bn2.running_var": (64,),
        "layer3.2.bn2.num_batches_tracked": (),
        "fc.weight": (10, 64),
        "fc.bias": (10,),
    }
    if option == "B":
        shapes["layer3.0.downsample.0.weight"] = (64, 32, 1, 1)
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_builder_options_reach_every_module() -> None:
    model = cifar.resnet32(num_classes=100, option="B", backend="reference")
    assert model.fc.out_features == 100
    fused = [m for m in model.modules() if hasattr(m, "backend")]
    assert len(fused) == 1 + 3 * 5
    assert all(m.backend == "reference" for m in fused)


def test_weights_from_state_dict_and_file(tmp_path) -> None:
    torch.manual_seed(3)
    source = cifar.resnet20(option="B")
    randomize_bn_(source)
    state = source.state_dict()
    path = tmp_path / "resnet20.pt"
    torch.save(state, path)
    for weights in (state, path, str(path)):
        loaded = cifar.resnet20(option="B", weights=weights).state_dict()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key


def test_weights_are_loaded_strictly() -> None:
    state = cifar.resnet20(option="B").state_dict()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        cifar.resnet20(option="A", weights=state)
    del state["fc.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        cifar.resnet20(option="B", weights=state)


# ------------------------------------------------------------------------------------------------ acceptance
def test_resnet1202_forward_backward() -> None:
    assert_deep_net_trains_and_evaluates(cifar.resnet1202())


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.randn(3, 32, 32), ValueError, "4-D"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating point"),
        (torch.randn(2, 1, 32, 32), ValueError, "3 channels"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, "dtype"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_problem(bad, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        cifar.resnet20()(bad)


def test_bad_builder_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="option must be 'A'"):
        cifar.resnet20(option="C")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        cifar.resnet20(backend="cudnn")
