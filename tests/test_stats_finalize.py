"""The CUDA statistics kernels that also finalize (launch_bn_stats_finalize; the op bn_stats_finalize,
cpp_passes.stats_finalize) against the PyTorch formulas they replace: stats.finalize (running stats, once, as
nn.BatchNorm2d) and conv_bn_act_train._scale_shift. On CPU tensors through the host emulation
(tests/cuda_on_host.py), and through the extension on a GPU. The kernels divide and take square roots correctly
rounded, ATen's rsqrt may be off by an ulp or two, and the shift may cancel: a few ulps of tolerance."""

import copy

import pytest
import torch
from cuda_on_host import emulated_cuda_ops_on_cpu
from cuda_on_host import stats_finalize as host_stats_finalize
from cuda_on_host import unavailable as host_cuda_unavailable
from model_checks import randomized_batch_norm
from torch import nn

from fused_resnet.training import cpp_passes
from fused_resnet.training.conv_bn_act_train import _scale_shift
from fused_resnet.training.stats import BatchStats, finalize, running_update

TOL = dict(rtol=1e-6, atol=1e-5)  # as tests/test_channel_math.py


def _host(y, bn, gamma, beta, count):
    """cpp_passes.stats_finalize's steps, with the emulated kernels in place of the op."""
    update, factor = running_update(bn)
    running = (bn.running_mean, bn.running_var) if update else (None, None)
    mean, _, invstd, scale, shift = host_stats_finalize(y, gamma, beta, *running, float(count), bn.eps, factor)
    return mean, invstd, scale, shift


def _cuda(y, bn, gamma, beta, count):
    return cpp_passes.stats_finalize(y, bn, gamma, beta, count)


WHERE = [
    pytest.param(
        ("cpu", _host),
        marks=pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers"),
        id="host",
    ),
    pytest.param(("cuda", _cuda), marks=pytest.mark.gpu, id="cuda"),
]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_the_pytorch_formulas(where, dtype, momentum, affine):
    device, run = where
    if device == "cuda" and cpp_passes.unsupported("cuda", dtype) is not None:
        pytest.skip(cpp_passes.unsupported("cuda", dtype))
    # 40 channels: a second block of 32 channels in the merge kernel, partly empty. |mean| ≫ std.
    kernel_bn = randomized_batch_norm(40, momentum, affine, device)
    torch_bn = copy.deepcopy(kernel_bn)
    for step in range(3):
        y = (torch.randn(3, 40, 9, 7 + step, device=device) * 0.5 + 30).to(dtype)
        y = y.contiguous(memory_format=torch.channels_last)
        count = y.numel() // 40
        gamma, beta = kernel_bn.weight, kernel_bn.bias
        mean, invstd, scale, shift = run(y, kernel_bn, gamma, beta, count)
        var, want_mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        stats = BatchStats(torch.full_like(want_mean, count), want_mean, var * count)
        want_mean, want_invstd = finalize(stats, torch_bn, count)
        want_scale, want_shift = _scale_shift(want_mean, want_invstd, torch_bn.weight, torch_bn.bias)
        # The statistics themselves carry fp32 rounding of a mean of 30: compare at that scale.
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
        for got, want in ((invstd, want_invstd), (scale, want_scale), (shift, want_shift)):
            torch.testing.assert_close(got.double(), want.double(), rtol=2e-4, atol=2e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(kernel_bn, name).double(), getattr(torch_bn, name).double(), **TOL)
    assert int(kernel_bn.num_batches_tracked) == int(torch_bn.num_batches_tracked) == 3


@pytest.mark.parametrize("where", WHERE)
def test_running_stats_stay_where_batchnorm_leaves_them(where):
    device, run = where
    bn = nn.BatchNorm2d(16, track_running_stats=False).to(device)
    y = torch.randn(2, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    _, invstd, _, _ = run(y, bn, bn.weight, bn.bias, 50)
    var = torch.var(y.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var + bn.eps), rtol=1e-5, atol=0)
    assert bn.running_mean is None and bn.running_var is None


@pytest.mark.gpu
def test_opcheck():
    if cpp_passes.unsupported("cuda", torch.float32) is not None:
        pytest.skip(cpp_passes.unsupported("cuda", torch.float32))
    y = torch.randn(2, 5, 3, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    gamma, beta, running_mean = (torch.randn(5, device="cuda") for _ in range(3))
    running_var = torch.rand(5, device="cuda") + 0.5
    args = (y, gamma, beta, running_mean, running_var, 24.0, 1e-5, 0.1)
    torch.library.opcheck(torch.ops.fused_resnet_C.bn_stats_finalize.default, args)
    torch.library.opcheck(
        torch.ops.fused_resnet_C.bn_stats_finalize.default, (y, None, None, None, None, 24.0, 1e-5, 0.0)
    )


@pytest.fixture
def emulated_op_on_cpu(monkeypatch):
    """bn_stats_finalize emulated on CPU and the training Function allowed to take it there: the forward's new
    branch (ConvBNActTrain.forward) runs in CI. Yields each call's count."""
    yield from emulated_cuda_ops_on_cpu(
        monkeypatch,
        {"bn_stats_finalize": host_stats_finalize},
        cpp_passes,
        "finalize_applies",
        record=lambda name, args: args[5],
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_training_forward_takes_it_once_per_step(emulated_op_on_cpu, momentum, affine, track):
    from fused_resnet.training.conv_bn_act_train import conv_bn_act_train

    if track:
        bn = randomized_batch_norm(16, momentum, affine, "cpu")
    else:
        bn = nn.BatchNorm2d(16, affine=affine, track_running_stats=False)
    stock = copy.deepcopy(bn)
    w = torch.randn(16, 8, 3, 3) * 0.1
    versions = []
    for step in range(3):
        x = torch.randn(2, 8, 6, 5 + step).contiguous(memory_format=torch.channels_last)
        out = conv_bn_act_train(x.requires_grad_(), w, bn, relu=True, passes="cpp")
        out.sum().backward()
        want = torch.relu(stock(torch.nn.functional.conv2d(x.detach(), w)))
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        if track:
            versions.append(bn.running_mean._version)
    assert len(emulated_op_on_cpu) == 3
    if track:
        torch.testing.assert_close(bn.running_mean, stock.running_mean, **TOL)
        torch.testing.assert_close(bn.running_var, stock.running_var, **TOL)
        assert int(bn.num_batches_tracked) == int(stock.num_batches_tracked) == 3
        assert versions[0] < versions[1] < versions[2]  # the eval-mode fold cache sees every update
