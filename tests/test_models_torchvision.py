"""The torchvision family: state_dict layout, strict loading, and parity with torchvision (fp32 and fp64)."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.check import check_model, compare, randomize_bn_
from fused_resnet.models import TORCHVISION_BUILDERS
from fused_resnet.tolerances import relative_error

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "torchvision_state_dicts.json").read_text())


@pytest.mark.parametrize("name", TORCHVISION_BUILDERS)
def test_state_dict_matches_golden_keys_and_shapes(name):
    fused = getattr(fused_resnet, name)()
    assert {k: list(v.shape) for k, v in fused.state_dict().items()} == GOLDEN[name]
    assert list(fused.state_dict()) == list(GOLDEN[name])  # same order too


@pytest.mark.parametrize("name", TORCHVISION_BUILDERS)
def test_torchvision_checkpoint_loads_strictly(name, tmp_path):
    state = getattr(torchvision.models, name)(num_classes=7).state_dict()
    from_dict = getattr(fused_resnet, name)(weights=state, num_classes=7)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    from_file = getattr(fused_resnet, name)(weights=str(path), num_classes=7)
    for model in (from_dict, from_file):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_done_when_resnet50_weights_match_torchvision_eval_fp32():
    reference = randomize_bn_(torchvision.models.resnet50()).eval()
    fused = fused_resnet.resnet50(weights=reference.state_dict()).eval()
    converted = fused_resnet.fuse(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        assert relative_error(fused(x), expected) <= 1e-5
        assert relative_error(converted(x), expected) <= 1e-5


# Every variant, eval + train, forward + input/param gradients + running stats + an SGD step, in fp32 against an
# fp64 torchvision reference. Inputs keep >= 8 values per BN channel in layer4 (2×3×64×64 → 2×2×2): with fewer,
# train-mode BN gradients are so ill-conditioned that stock fp32 itself is off by O(1).
FP32_CASES = [
    ("resnet18", (2, 3, 64, 64)),
    ("resnet18", (1, 3, 97, 131)),
    ("resnet34", (2, 3, 64, 64)),
    ("resnet50", (2, 3, 64, 64)),
    ("resnet50", (1, 3, 97, 131)),
    ("resnet101", (2, 3, 64, 64)),
    ("resnet152", (2, 3, 64, 64)),
    ("resnext50_32x4d", (2, 3, 64, 64)),
    ("resnext101_32x8d", (2, 3, 64, 64)),
    ("resnext101_64x4d", (2, 3, 64, 64)),
    ("wide_resnet50_2", (2, 3, 64, 64)),
    ("wide_resnet101_2", (2, 3, 64, 64)),
]
# In fp64 the comparison is tight enough (1e-10) to catch any semantic difference that fp32 conditioning could
# hide; one case per block kind (basic, bottleneck, grouped, wide) covers every code path.
FP64_CASES = [
    ("resnet18", (1, 3, 97, 131)),
    ("resnet50", (2, 3, 64, 64)),
    ("resnext50_32x4d", (2, 3, 64, 64)),
    ("wide_resnet50_2", (1, 3, 97, 131)),
]
CASES = [(n, s, torch.float32) for n, s in FP32_CASES] + [(n, s, torch.float64) for n, s in FP64_CASES]


@pytest.mark.parametrize(
    "name,shape,dtype", CASES, ids=[f"{n}-{'x'.join(map(str, s))}-{str(d)[6:]}" for n, s, d in CASES]
)
def test_parity_with_torchvision(name, shape, dtype):
    rows = check_model(name, dtype=dtype, shape=shape)
    assert len(rows) == 6
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(map(str, failed))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_on_gpu_per_backend(backend, dtype):
    # Eval through the backend's conv kernel, train through its training passes (triton: Triton kernels; cuda: the
    # extension's CUDA kernels), against torchvision in fp64 on the same GPU. ResNet-18: fewer conv shapes to compile
    # (Triton) in the GPU check's time budget; the bench's parity column covers ResNet-50.
    rows = check_model("resnet18", dtype=dtype, device="cuda", shape=(4, 3, 64, 64), backend=backend)
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(map(str, failed))


def test_parity_catches_a_wrong_model():
    # The harness must fail when the candidate differs: a fused model with one BN's eps changed.
    reference = randomize_bn_(torchvision.models.resnet18())
    candidate = fused_resnet.fuse(reference)
    candidate.layer2[1].bn2.eps = 1e-1
    rows = compare("resnet18", reference, candidate, torch.randn(2, 3, 64, 64), torch.float64)
    assert not any(r.passed for r in rows if r.quantity == "eval forward")


def test_replace_stride_with_dilation_parity():
    kwargs = {"replace_stride_with_dilation": [False, True, True]}
    reference = randomize_bn_(torchvision.models.resnet50(**kwargs)).eval()
    fused = fused_resnet.resnet50(weights=reference.state_dict(), **kwargs).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused.double()(x), reference.double()(x)) <= 1e-10


def test_zero_init_residual_and_num_classes_like_torchvision():
    torch.manual_seed(3)
    reference = torchvision.models.resnet50(num_classes=5, zero_init_residual=True)
    torch.manual_seed(3)
    fused = fused_resnet.resnet50(num_classes=5, zero_init_residual=True)
    # Same construction order, so the same seed gives the same initialisation.
    for (key, a), b in zip(fused.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert torch.count_nonzero(fused.layer1[0].bn3.weight) == 0


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    v1 = fused_resnet.resnet50(stride_in_1x1=True)
    block = v1.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert list(v1.state_dict()) == list(GOLDEN["resnet50"])
    v1.eval()
    # Against a torchvision model with the stride moved by hand: the original (V1) bottleneck.
    reference = randomize_bn_(torchvision.models.resnet50()).eval()
    for layer in (reference.layer2, reference.layer3, reference.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    v1.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(v1.double()(x), reference.double()(x)) <= 1e-10
    with pytest.raises(ValueError, match="Bottleneck"):
        fused_resnet.resnet18(stride_in_1x1=True)


def test_frozen_batchnorm_is_accepted_and_other_norms_are_rejected():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    reference = torchvision.models.resnet18(norm_layer=frozen)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, frozen):
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    fused = fused_resnet.resnet18(norm_layer=frozen, weights=reference.state_dict()).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert relative_error(fused.double()(x), reference.double()(x)) <= 1e-10
    with pytest.raises(ValueError, match="GroupNorm"):
        fused_resnet.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(2, c))


def test_weights_enum_and_bad_paths_are_refused(tmp_path):
    with pytest.raises(TypeError, match="downloads nothing"):
        fused_resnet.resnet18(weights=torchvision.models.ResNet18_Weights.DEFAULT)
    with pytest.raises(FileNotFoundError):
        fused_resnet.resnet18(weights=str(tmp_path / "missing.pt"))


def test_checkpoint_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        fused_resnet.resnet18(weights=path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = fused_resnet.resnet18(weights=path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
