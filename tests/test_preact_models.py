"""Pre-activation ResNets (fused_resnet.models.preact) against a plain PyTorch pre-activation ResNet written here.

The reference uses nn.Conv2d / nn.BatchNorm2d / F.relu with a straight-line forward, applies each block's bn1 +
ReLU once and feeds both the residual branch and the projection shortcut from it (He et al.'s reference code),
and loads the fused model's state dict strictly. BN parameters and running statistics are randomised first:
default-initialised BN is nearly the identity and would hide wiring bugs. Parity runs through
fused_resnet.check.compare (eval and train forward, input and parameter gradients, running stats, an SGD step;
float64 reference; float32 also judged against stock PyTorch's own float32 error, which for preact164 in train
mode at batch 2 is large: ~4e-5 on the logits and ~4e-2 on the gradients, many ReLU flips included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_deep_net_trains_and_evaluates
from torch import nn

from fused_resnet.check import compare, randomize_bn_
from fused_resnet.models import preact

# Model wiring is what is tested here; each backend's op is tested against the reference op on its own.
BACKEND = "reference"
DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ reference
class RefPreActBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class RefPreActResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [RefPreActBottleneck(inplanes, planes, stride)]
            blocks += [RefPreActBottleneck(4 * planes, planes, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = 4 * planes
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused model's memory format: the float32 yardstick (stock PyTorch's own error against float64) then
        # comes from the same CPU kernels. NCHW kernels are 2-6x more accurate for conv/BN, and ReLU flips (a
        # pre-activation within rounding of 0 passing or blocking a unit's gradient) would fall elsewhere.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn_final(x))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------ parity
# bn1 feeds two convs in the first block of each stage: "running stats" also checks it moves once per step.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_with_plain_pytorch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    fused = randomize_bn_(preact.preact_resnet164(backend=BACKEND))
    reference = RefPreActResNet(18)
    reference.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = compare("preact_resnet164", reference, fused, x, dtype)
    assert len(rows) == 6
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(map(str, failed))


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize(("depth", "n", "params"), [(164, 18, 1_703_258), (1001, 111, 10_327_706)])
def test_construction_and_parameter_count(depth: int, n: int, params: int) -> None:
    model = getattr(preact, f"preact_resnet{depth}")()
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    # He et al. 2016 report 1.7M and 10.2M parameters.
    assert sum(p.numel() for p in model.parameters()) == params
    downsampled = [name for name, _ in model.named_modules() if name.endswith("downsample")]
    assert downsampled == ["layer1.0.downsample", "layer2.0.downsample", "layer3.0.downsample"]


def _golden_shapes(n: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        shapes = {f"{prefix}.{s}": (c,) for s in ("weight", "bias", "running_mean", "running_var")}
        return shapes | {f"{prefix}.num_batches_tracked": ()}

    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}
    for stage, (planes, first_cin) in enumerate(((16, 16), (32, 64), (64, 128)), start=1):
        for block in range(n):
            p, cin = f"layer{stage}.{block}.", first_cin if block == 0 else 4 * planes
            shapes |= bn(p + "bn1", cin) | {p + "conv1.weight": (planes, cin, 1, 1)}
            shapes |= bn(p + "bn2", planes) | {p + "conv2.weight": (planes, planes, 3, 3)}
            shapes |= bn(p + "bn3", planes) | {p + "conv3.weight": (4 * planes, planes, 1, 1)}
            if block == 0:
                shapes[p + "downsample.weight"] = (4 * planes, cin, 1, 1)
    return shapes | bn("bn_final", 256) | {"fc.weight": (num_classes, 256), "fc.bias": (num_classes,)}


def test_state_dict_layout_is_golden() -> None:
    state = preact.preact_resnet164(num_classes=100).state_dict()
    golden = _golden_shapes(18, 100)
    assert list(state) == list(golden)
    assert {k: tuple(v.shape) for k, v in state.items()} == golden


def test_builder_options_reach_every_module() -> None:
    model = preact.preact_resnet164(backend="reference")
    fused = [m for m in model.modules() if hasattr(m, "backend")]
    assert len(fused) == 1 + 3 * 18
    assert all(m.backend == "reference" for m in fused)


def test_weights_from_state_dict_and_file(tmp_path) -> None:
    torch.manual_seed(3)
    source = preact.preact_resnet164()
    randomize_bn_(source)
    state = source.state_dict()
    path = tmp_path / "preact164.pt"
    torch.save(state, path)
    for weights in (state, path):
        loaded = preact.preact_resnet164(weights=weights).state_dict()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key
    del state["bn_final.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        preact.preact_resnet164(weights=state)


# ------------------------------------------------------------------------------------------------ acceptance
def test_preact_resnet1001_forward_backward() -> None:
    assert_deep_net_trains_and_evaluates(preact.preact_resnet1001())


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.randn(2, 3, 32), ValueError, "4-D"),
        (torch.randn(2, 4, 32, 32), ValueError, "3 channels"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float16), TypeError, "dtype"),
    ],
)
def test_bad_inputs_name_the_problem(bad: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        preact.preact_resnet164()(bad)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        preact.preact_resnet164(backend="tpu")
