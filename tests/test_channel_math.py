"""The per-channel arithmetic kernels (training/channel_math.py) against the PyTorch formulas they replace
(stats.finalize, conv_bn_act_train._scale_shift and backward's coefficients), under the Triton interpreter on CPU
or compiled on a GPU; fp32 statistics (fp64 units keep the PyTorch formulas). The kernels divide and take square
roots correctly rounded, ATen's rsqrt may be off by an ulp or two: a few ulps of tolerance."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_checks import randomized_batch_norm
from sm90_compile import assert_compiles
from torch import nn

from fused_resnet.nn import ConvBNAct
from fused_resnet.tolerances import forward_rtol, relative_error
from fused_resnet.training import channel_math
from fused_resnet.training.conv_bn_act_train import _scale_shift
from fused_resnet.training.stats import BatchStats, finalize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not channel_math.INTERPRET:
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
# On a GPU these run the compiled kernels, in the GPU check's `pytest -m gpu` too.
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
TOL = dict(rtol=1e-6, atol=1e-5)  # shift = beta - mean·scale may cancel: absolute error ~ |mean·scale|·ulps


def _bn(c: int, momentum: float | None, dtype: torch.dtype, affine: bool = True) -> nn.BatchNorm2d:
    return randomized_batch_norm(c, momentum, affine, DEVICE, dtype)


def _stats(c: int, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.randn(c, dtype=acc, device=DEVICE) * 3
    m2 = torch.rand(c, dtype=acc, device=DEVICE) * 50 + 1
    return mean, m2


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("affine", [True, False])
def test_finalize_matches_the_pytorch_formulas(momentum, affine):
    acc = torch.float32
    # 300 channels: more than one block of the kernel, the last one partial.
    kernel_bn = _bn(300, momentum, acc, affine)
    torch_bn = copy.deepcopy(kernel_bn)
    for step in range(3):
        mean, m2 = _stats(300, acc)
        count = 40 + step
        invstd, scale, shift = channel_math.finalize_scale_shift(
            mean, m2, count, kernel_bn, kernel_bn.weight, kernel_bn.bias
        )
        stats = BatchStats(torch.full_like(mean, count), mean, m2)
        want_mean, want_invstd = finalize(stats, torch_bn, count)
        want_scale, want_shift = _scale_shift(want_mean, want_invstd, torch_bn.weight, torch_bn.bias)
        for got, want in ((invstd, want_invstd), (scale, want_scale), (shift, want_shift)):
            torch.testing.assert_close(got, want, **TOL)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(kernel_bn, name), getattr(torch_bn, name), **TOL)
    assert int(kernel_bn.num_batches_tracked) == int(torch_bn.num_batches_tracked) == 3


def test_finalize_leaves_running_stats_alone_where_batchnorm_would():
    for bn in (_bn(8, 0.1, torch.float32), nn.BatchNorm2d(8, track_running_stats=False).to(DEVICE)):
        if bn.track_running_stats:
            bn.eval()  # a unit that normalizes with batch statistics outside training mode: no update
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        mean, m2 = _stats(8, torch.float32)
        invstd, _, _ = channel_math.finalize_scale_shift(mean, m2, 10, bn, None, None)
        torch.testing.assert_close(invstd, torch.rsqrt(m2 / 10 + bn.eps), **TOL)
        for k, v in bn.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_low_precision_running_stats_round_like_aten():
    # A bf16 BN module: ATen rounds the new mean/var to bf16, lerps in fp32, rounds again. Compiled, the kernel's
    # casts round to nearest as ATen's do, but its fp32 division may differ from ATen's by an ulp, which can move
    # a bf16 rounding by one step (2^-7 relative). The triton 3.8 interpreter's fp32 -> bf16 cast truncates
    # (measured: -0.33175 became -0.33008, not -0.33203), twice here: the new mean (|mean| < 10, a bf16 step of
    # up to 2^-4, times momentum 0.1) and the result; that much is allowed there.
    tol = dict(rtol=2**-7, atol=0) if DEVICE.type == "cuda" else dict(rtol=2**-7, atol=2**-4 * 0.1)
    kernel_bn = _bn(64, 0.1, torch.bfloat16)
    torch_bn = copy.deepcopy(kernel_bn)
    mean, m2 = _stats(64, torch.float32)
    channel_math.finalize_scale_shift(mean, m2, 12, kernel_bn, kernel_bn.weight, kernel_bn.bias)
    finalize(BatchStats(torch.full_like(mean, 12), mean, m2), torch_bn, 12)
    torch.testing.assert_close(kernel_bn.running_mean, torch_bn.running_mean, **tol)
    torch.testing.assert_close(kernel_bn.running_var, torch_bn.running_var, **tol)


def test_backward_coefficients_match_the_pytorch_formulas():
    acc = torch.float32
    a, sum_g, sum_gy, mean = (torch.randn(300, dtype=acc, device=DEVICE) for _ in range(4))
    invstd = torch.rand(300, dtype=acc, device=DEVICE) + 0.5
    b, c = channel_math.coefficients(a, sum_g, sum_gy, invstd, mean, 50)
    k = invstd.square() * sum_gy / 50
    torch.testing.assert_close(b, -a * k, **TOL)
    torch.testing.assert_close(c, a * (k * mean - sum_g / 50), **TOL)


def test_where_the_kernels_run():
    y = torch.zeros(2, 4, 3, 3, device=DEVICE)
    if DEVICE.type == "cuda":
        assert channel_math.applies(y, "cpp") and channel_math.applies(y, "torch")
    else:  # CPU tensors: only the Triton passes, under the interpreter (the others stay on PyTorch ops)
        assert channel_math.applies(y, "triton")
        assert not channel_math.applies(y, "cpp") and not channel_math.applies(y, "torch")
    assert not channel_math.applies(y.double(), "triton")  # fp64 units keep the PyTorch formulas
    assert not torch.compile(lambda t: torch.tensor(channel_math.applies(t, "triton")), backend="eager")(y)


_COMPILE_SCRIPT = """
import torch
from torch import nn

from fused_resnet.training import channel_math

assert not channel_math.INTERPRET
mean, m2 = torch.zeros(64), torch.ones(64)
for bn in (nn.BatchNorm2d(64), nn.BatchNorm2d(64, affine=False).to(torch.bfloat16)):
    gamma = bn.weight
    compiles(lambda: channel_math.finalize_scale_shift(mean, m2, 10, bn, gamma, bn.bias), "finalize")
compiles(lambda: channel_math.coefficients(mean, mean, mean, m2, mean, 10), "coefficients")
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the tests above compile the kernels for real")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    assert_compiles(_COMPILE_SCRIPT, expected=3)


def test_running_stat_updates_invalidate_the_eval_fold():
    # The kernel writes the running stats through pointers; their version counters must still move, or the
    # eval-mode fold cached before a train-mode forward (BN recalibration, no optimizer step) would stay stale.
    bn = _bn(8, 0.1, torch.float32)
    versions = (bn.running_mean._version, bn.running_var._version)
    mean, m2 = _stats(8, torch.float32)
    channel_math.finalize_scale_shift(mean, m2, 10, bn, bn.weight, bn.bias)
    assert bn.running_mean._version > versions[0] and bn.running_var._version > versions[1]


def test_eval_after_a_train_forward_uses_the_new_running_stats():
    torch.manual_seed(0)
    unit = ConvBNAct(4, 8, 3, padding=1, backend="triton").to(DEVICE)
    x = torch.randn(2, 4, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        unit.eval()(x)  # folds BN into the conv and caches the fold
        unit.train()(x * 3 + 1)  # moves the running stats (through the kernel), no optimizer step
        got = unit.eval()(x)
    bn = unit.bn
    want = F.batch_norm(F.conv2d(x, unit.conv.weight, padding=1), bn.running_mean, bn.running_var, bn.weight, bn.bias)
    # (stale statistics are off by O(1); the tolerance is fp32's, TF32's on a GPU)
    assert relative_error(got, torch.relu(want)) <= forward_rtol(torch.float32, DEVICE)
