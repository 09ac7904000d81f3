"""The CUDA backward-sum kernels that also work out the coefficients (launch_bn_grad_sums_coefficients; the op
bn_grad_sums_coefficients, cpp_passes.grad_sums_coefficients) against what they replace: bn_grad_sums itself and
the formulas of conv_bn_act_train's backward (channel_math.coefficients' order). On CPU tensors through the host
emulation (tests/cuda_on_host.py), and through the extension on a GPU.

Tolerances: the sums come from bn_grad_sums' own kernels, so they must be equal bit for bit; dL/dγ is one fp32
product of them, also exact. b and c are a few fp32 operations on the sums, where the kernel may fuse a multiply
and an add (one rounding where PyTorch rounds twice) and c may cancel: a few fp32 ulps of its terms.
"""

import copy

import pytest
import torch
from cuda_on_host import emulated_cuda_ops_on_cpu
from cuda_on_host import grad_sums as host_grad_sums
from cuda_on_host import grad_sums_coefficients as host_grad_sums_coefficients
from cuda_on_host import unavailable as host_cuda_unavailable
from model_checks import randomized_batch_norm

from fused_resnet.training import cpp_passes

WHERE = [
    pytest.param(
        ("cpu", host_grad_sums, host_grad_sums_coefficients),
        marks=pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers"),
        id="host",
    ),
    pytest.param(("cuda", cpp_passes.grad_sums, None), marks=pytest.mark.gpu, id="cuda"),
]


def _op(*args):
    return torch.ops.fused_resnet_C.bn_grad_sums_coefficients(*args)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
# 40 channels: the 16-byte kernels and a second, partly empty block of 32 channels in the merge; 12 channels of
# 16-bit values are not whole 16-byte vectors: the scalar kernels.
@pytest.mark.parametrize("channels", [40, 12])
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
def test_matches_grad_sums_and_the_formulas(where, dtype, channels, residual, relu):
    device, grad_sums, fused = where
    if device == "cuda" and cpp_passes.unsupported("cuda", dtype) is not None:
        pytest.skip(cpp_passes.unsupported("cuda", dtype))
    fused = fused or _op
    shape = (3, channels, 9, 7)  # 189 pixels: a partial last chunk
    y, g, r = (torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last) for _ in "ygr")
    r = r if residual else None
    scale, shift, mean = (torch.randn(channels, device=device) for _ in range(3))
    invstd = torch.rand(channels, device=device) + 0.5
    count = y.numel() // channels
    store = residual and relu
    sum_g, sum_gy, masked = grad_sums(g, y, scale, shift, r, mean, relu, store)
    got_g, grad_gamma, b, c, got_masked = fused(g, y, scale, shift, r, mean, invstd, relu, store, float(count))
    assert torch.equal(got_g, sum_g)
    if store:
        assert torch.equal(got_masked, masked)
    assert torch.equal(grad_gamma, sum_gy * invstd)
    # conv_bn_act_train's formulas in fp64 on the same sums: k = invstd²·Σg'(y − μ)/n, b = −a·k, c = a·(k·μ − Σg'/n)
    a, k = scale.double(), invstd.double().square() * sum_gy.double() / count
    want_b, want_c = -a * k, a * (k * mean.double() - sum_g.double() / count)
    eps = torch.finfo(torch.float32).eps
    assert ((b.double() - want_b).abs() <= 4 * eps * want_b.abs()).all()
    terms = a.abs() * ((k * mean.double()).abs() + (sum_g.double() / count).abs())
    assert ((c.double() - want_c).abs() <= 8 * eps * terms).all()


@pytest.mark.gpu
def test_opcheck():
    if cpp_passes.unsupported("cuda", torch.bfloat16) is not None:
        pytest.skip(cpp_passes.unsupported("cuda", torch.bfloat16))
    y, g, r = (torch.randn(2, 8, 3, 4, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    y, g, r = (t.contiguous(memory_format=torch.channels_last) for t in (y, g, r))
    scale, shift, mean = (torch.randn(8, device="cuda") for _ in range(3))
    invstd = torch.rand(8, device="cuda") + 0.5
    for residual, store in ((r, True), (None, False)):
        args = (g, y, scale, shift, residual, mean, invstd, True, store, 24.0)
        torch.library.opcheck(torch.ops.fused_resnet_C.bn_grad_sums_coefficients.default, args)


@pytest.mark.gpu
def test_refuses_a_wrong_count():
    if cpp_passes.unsupported("cuda", torch.float32) is not None:
        pytest.skip(cpp_passes.unsupported("cuda", torch.float32))
    y = torch.randn(2, 8, 3, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    vectors = [torch.rand(8, device="cuda") for _ in range(4)]
    with pytest.raises(RuntimeError, match="count must be the 24 values per channel"):
        _op(y, y, *vectors[:2], None, *vectors[2:], True, False, 23.0)


@pytest.fixture
def emulated_op_on_cpu(monkeypatch):
    """bn_grad_sums_coefficients emulated on CPU and the training Function allowed to take it there: the backward's
    new branch (conv_bn_act_train._backward) runs in CI. Yields each call's count."""
    yield from emulated_cuda_ops_on_cpu(
        monkeypatch,
        {"bn_grad_sums_coefficients": host_grad_sums_coefficients},
        cpp_passes,
        "coefficients_apply",
        record=lambda name, args: args[-1],
    )


@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (True, False)])
def test_training_backward_takes_it_once_per_unit(emulated_op_on_cpu, residual, relu):
    from fused_resnet.training.conv_bn_act_train import conv_bn_act_train

    bn = randomized_batch_norm(16, 0.1, True, "cpu")
    stock = copy.deepcopy(bn)
    w = (torch.randn(16, 8, 3, 3) * 0.1).requires_grad_()
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 16, 4, 3).contiguous(memory_format=torch.channels_last).requires_grad_() if residual else None
    g = torch.randn(2, 16, 4, 3)
    out = conv_bn_act_train(x, w, bn, residual=r, relu=relu, passes="cpp")
    got = torch.autograd.grad(out, [x, w, bn.weight, bn.bias] + ([r] if residual else []), g)
    want_out = stock(torch.nn.functional.conv2d(x, w)) + (r if residual else 0)
    want_out = torch.relu(want_out) if relu else want_out
    want = torch.autograd.grad(want_out, [x, w, stock.weight, stock.bias] + ([r] if residual else []), g)
    assert emulated_op_on_cpu == [float(out.numel() // 16)]
    for name, a, b in zip(["x", "weight", "gamma", "beta", "residual"], got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
