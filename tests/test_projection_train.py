"""A block end with a projection shortcut as one training unit (fused_resnet/training/projection_train.py) against
stock nn modules: relu(bn(conv(h)) + bn_s(conv_s(x))), forward, every gradient and both BNs' running stats, on each
pass implementation that runs here; gradcheck in float64; the models take it in training only.

Tolerances: float64 (rounding out of the way) to 1e-10 of the result; float32 to 1e-4, as the other unit tests of
the training path (a sum over the batch of BN's gradient cancels: its error is fp32's relative to the terms).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from cuda_on_host import emulated_cuda_ops_on_cpu
from cuda_on_host import grad_sums_coefficients as host_grad_sums_coefficients
from cuda_on_host import unavailable as host_cuda_unavailable
from model_checks import randomized_batch_norm
from torch import nn

import fused_resnet
from fused_resnet.nn.functional import conv_bn_projection_act
from fused_resnet.ops.conv_config import ConvConfig
from fused_resnet.tolerances import relative_error
from fused_resnet.training import cpp_passes, passes
from fused_resnet.training.projection_train import ProjectionEndTrain, projection_end_train

CONFIG = ConvConfig()  # the block end's 1x1 conv
CONFIG_S = ConvConfig(stride=(2, 2))  # the projection: 1x1, stride 2


def _runs_on_cpu(name: str) -> object:
    reason = passes._unsupported(name, "cpu", torch.float32)
    return pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [])


PASSES = [_runs_on_cpu(name) for name in ("torch", "cpp", "triton")]


def _case(dtype: torch.dtype, affine: bool = True, momentum: float | None = 0.1, device: str = "cpu", out: int = 8):
    """(h, x, weight, weight_s, bn, bn_s) of a small block end: 6 channels in, `out` out, x at twice h's size,
    channels_last."""
    torch.manual_seed(0)
    fmt = torch.channels_last
    h = torch.randn(2, 6, 5, 4, dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_()
    x = torch.randn(2, 4, 10, 8, dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(out, 6, 1, 1, dtype=dtype, device=device) * 0.5).requires_grad_()
    w_s = (torch.randn(out, 4, 1, 1, dtype=dtype, device=device) * 0.5).requires_grad_()
    bn, bn_s = (randomized_batch_norm(out, momentum, affine, device, dtype) for _ in range(2))
    return h, x, w, w_s, bn, bn_s


def _stock(h, x, w, w_s, bn, bn_s) -> torch.Tensor:
    return torch.relu(bn(F.conv2d(h, w)) + bn_s(F.conv2d(x, w_s, stride=2)))


def _affine(*bns: nn.BatchNorm2d) -> list[torch.Tensor]:
    return [p for bn in bns for p in (bn.weight, bn.bias)]


def _check_against_stock(run, dtype, tol, affine=True, momentum=0.1, steps=2, device="cpu", out=8):
    h, x, w, w_s, bn, bn_s = _case(dtype, affine, momentum, device, out)
    stock_bn, stock_bn_s = copy.deepcopy(bn), copy.deepcopy(bn_s)
    for _ in range(steps):  # the running stats move once per step, from where the last step left them
        out = run(h, x, w, w_s, bn, bn_s)
        want = _stock(h, x, w, w_s, stock_bn, stock_bn_s)
        assert out.dtype == dtype and relative_error(out, want) < tol
        g = torch.randn_like(want)
        inputs = [h, x, w, w_s] + (_affine(bn, bn_s) if affine else [])
        stock_inputs = [h, x, w, w_s] + (_affine(stock_bn, stock_bn_s) if affine else [])
        names = ["h", "x", "weight", "weight_s", "gamma", "beta", "gamma_s", "beta_s"]
        got_grads = torch.autograd.grad(out, inputs, g)
        want_grads = torch.autograd.grad(want, stock_inputs, g)
        for name, a, b in zip(names, got_grads, want_grads, strict=False):
            assert relative_error(a, b) < tol, name
    for fused_bn, plain in ((bn, stock_bn), (bn_s, stock_bn_s)):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fused_bn, name), getattr(plain, name), rtol=tol, atol=0)


def _unit(passes_name: str):
    def run(h, x, w, w_s, bn, bn_s):
        return projection_end_train(h, w, bn, x, w_s, bn_s, CONFIG, CONFIG_S, passes_name)

    return run


@pytest.mark.parametrize("passes_name", PASSES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_unit_matches_stock(passes_name, dtype, tol):
    _check_against_stock(_unit(passes_name), dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("passes_name", ["cpp", "triton"])
@pytest.mark.parametrize("out", [8, 10])  # fp32: the CUDA kernels' 16-byte path (4 channels a vector), scalar
def test_unit_matches_stock_on_cuda(passes_name, out):
    reason = passes._unsupported(passes_name, "cuda", torch.float32)
    if reason is not None:
        pytest.skip(reason)
    with torch.backends.cudnn.flags(allow_tf32=False):  # both sides' convs in full fp32
        _check_against_stock(_unit(passes_name), torch.float32, 1e-4, device="cuda", out=out)


@pytest.mark.parametrize("affine, momentum", [(False, 0.1), (True, None)])
def test_unit_without_affine_or_with_cumulative_momentum(affine, momentum):
    _check_against_stock(_unit("torch"), torch.float64, 1e-10, affine, momentum, steps=3)


def test_gradcheck():
    h, x, w, w_s, bn, bn_s = _case(torch.float64)
    gammas = [b.weight.detach().clone().requires_grad_() for b in (bn, bn_s)]
    betas = [b.bias.detach().clone().requires_grad_() for b in (bn, bn_s)]

    def fn(h, w, gamma, beta, x, w_s, gamma_s, beta_s):
        args = (h, w, gamma, beta, x, w_s, gamma_s, beta_s, None, None, bn, bn_s, CONFIG, CONFIG_S, "torch")
        return ProjectionEndTrain.apply(*args)[0]

    inputs = (h, w, gammas[0], betas[0], x, w_s, gammas[1], betas[1])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.fixture
def emulated_coefficients_on_cpu(monkeypatch):
    """bn_grad_sums_coefficients with the CUDA kernels emulated on CPU, which the unit's backward then takes for
    both of its BNs (the block end's with the shortcut's residual scale). Yields whether each call had one."""
    yield from emulated_cuda_ops_on_cpu(
        monkeypatch,
        {"bn_grad_sums_coefficients": host_grad_sums_coefficients},
        cpp_passes,
        "coefficients_apply",
        record=lambda name, args: len(args) > 10 and args[10] is not None,  # the dispatcher drops a trailing None
    )


@pytest.mark.skipif(host_cuda_unavailable() is not None, reason=str(host_cuda_unavailable()))
@pytest.mark.parametrize("out", [8, 10])
def test_unit_through_the_cuda_kernels_backward(emulated_coefficients_on_cpu, out):
    _check_against_stock(_unit("cpp"), torch.float32, 1e-4, steps=1, out=out)
    assert emulated_coefficients_on_cpu == [True, False]  # the block end (scaled residual), then the shortcut


# --- the models ------------------------------------------------------------------------------------------------


def test_models_take_the_unit_in_training_only(monkeypatch):
    calls = []
    original = ProjectionEndTrain.apply
    monkeypatch.setattr(ProjectionEndTrain, "apply", lambda *a: calls.append(1) or original(*a))
    model = fused_resnet.resnet18(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    assert len(calls) == 3  # layer2-4 start with a projection
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert not calls
    model = fused_resnet.resnet18(num_classes=4, backend="reference").train()
    model(x)
    assert not calls  # the reference backend runs stock modules


def test_frozen_shortcut_bn_keeps_two_units():
    # A shortcut BN in eval mode (frozen statistics) is folded: the block end takes its output as a residual.
    tv = torchvision.models.resnet18(num_classes=4).double().train()
    tv.layer2[0].downsample[1].eval()
    fused = fused_resnet.fuse(tv)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert relative_error(fused(x), tv(x)) < 1e-10


def test_cifar_option_b_block_matches_stock():
    model = fused_resnet.resnet20(num_classes=3, option="B").double().train()
    block = model.layer2[0]
    assert block.downsample is not None
    plain = copy.deepcopy(block)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    got = block(x)
    ds = plain.downsample
    want = torch.relu(plain.bn2(plain.conv2(torch.relu(plain.bn1(plain.conv1(x))))) + ds[1](ds[0](x)))
    assert relative_error(got, want) < 1e-10
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [x, block.downsample[0].weight], g)
    want_g = torch.autograd.grad(want, [x, ds[0].weight], g)
    for a, b in zip(got_g, want_g, strict=True):
        assert relative_error(a, b) < 1e-10


def test_functional_checks_the_shortcut_input():
    h, x, w, w_s, bn, bn_s = _case(torch.float32)
    conv, conv_s = nn.Conv2d(6, 8, 1, bias=False), nn.Conv2d(5, 8, 1, stride=2, bias=False)
    with pytest.raises(ValueError, match="expected input with 5 channels, got 4"):
        conv_bn_projection_act(h, conv, bn.train(), x, conv_s, bn_s.train())
