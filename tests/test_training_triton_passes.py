"""The Triton training passes (fused_resnet/training/triton_passes.py) against fp64 formulas written out here,
then the training Function and modules on them against stock PyTorch.

CPU tensors run under the Triton interpreter (CI); the same tests run compiled on a GPU (marked gpu). Tolerances:
the kernels accumulate in fp32 (fp64 for fp64), so statistics and sums are compared at a few fp32 ulps relative to
the data's magnitude; outputs stored in bf16/fp16 may differ from the exactly rounded value by one ulp of the
output (the kernel's fused multiply-add rounds once where the formula rounds twice).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from sm90_compile import assert_compiles
from test_training_passes import _tensor, assert_stats
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.resnet import BasicBlock

import fused_resnet
from fused_resnet import ConvBNAct
from fused_resnet.check import randomize_bn_
from fused_resnet.ops.conv_config import ConvConfig
from fused_resnet.tolerances import relative_error
from fused_resnet.training import ConvBNActTrain, passes

pytestmark = pytest.mark.skipif("triton" not in passes.PASSES, reason="triton is not installed")
triton_passes = pytest.importorskip("fused_resnet.training.triton_passes")

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not triton_passes.INTERPRET, reason="CPU runs only under the interpreter")
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
interpreter_only = pytest.mark.skipif(not triton_passes.INTERPRET, reason="CPU tensors run only under the interpreter")
# --- statistics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [64, 128])  # one chunk per program, several chunks merged inside a program
def test_stats_partials_merge_within_and_across_programs(device, dtype, rows):
    y = _tensor((3, 5, 7, 9), dtype, torch.channels_last, device, offset=300.0, scale=0.5)
    assert_stats(triton_passes.batch_stats(y, rows), y)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_of_a_strided_view(device):
    # Every other row: h and w no longer collapse into one index, so the launcher copies first.
    y = _tensor((2, 4, 10, 6), torch.float32, torch.channels_last, device)[:, :, ::2]
    stats = triton_passes.batch_stats(y)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert relative_error(stats.mean, mean) < 1e-6
    assert relative_error(stats.m2 / stats.count, var) < 1e-6


@interpreter_only
def test_bad_inputs_are_refused_with_the_argument_named():
    y = torch.randn(2, 4, 3, 3)
    ok = torch.randn(4)
    with pytest.raises(ValueError, match="scale must be a contiguous torch.float32 vector of 4"):
        triton_passes.bn_normalize(y, ok.double(), ok, None, True)
    with pytest.raises(ValueError, match="residual must have y's shape"):
        triton_passes.bn_normalize(y, ok, ok, torch.randn(2, 4, 3, 2), True)
    with pytest.raises(ValueError, match=r"expected an \(N, C, H, W\) tensor"):
        triton_passes.bn_normalize(y[0], ok, ok, None, True)
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported"):
        triton_passes.batch_stats(torch.ones(2, 4, 3, 3, dtype=torch.int32))


@interpreter_only
def test_opcheck():
    y = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    g, r = torch.randn(2, 4, 3, 5), torch.randn_like(y)
    v = [torch.randn(4) for _ in range(6)]
    ops = torch.ops.fused_resnet
    torch.library.opcheck(ops.bn_partial_stats, (y, 64))
    torch.library.opcheck(ops.bn_normalize, (y, v[0], v[1], r, True))
    torch.library.opcheck(ops.bn_grad_sums, (g, y, v[0], v[1], r, v[2], True, True, 64))
    torch.library.opcheck(ops.bn_grad_sums, (g, y, v[0], v[1], None, v[2], True, False, 64))
    torch.library.opcheck(ops.bn_grad_input, (g, y, v[0], v[1], r, v[3], v[4], v[5], True))


_COMPILE_SCRIPT = """
import torch

from fused_resnet.training import triton_passes as tp

assert not tp.INTERPRET
y = torch.zeros(2, 96, 5, 7).contiguous(memory_format=torch.channels_last)
m, c, hw = 2 * 5 * 7, 96, 5 * 7
s = tp._hw_strides(y)
for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    yd, v = y.to(dtype), torch.zeros(2, c, dtype=acc)
    dense = dtype != torch.float64  # both ways of indexing rows
    compiles(
        lambda: tp._stats_kernel[(1, 2)](yd, v, v, m, c, hw, 128, *s, DENSE_ROWS=dense, BLOCK_M=64, BLOCK_C=64),
        f"stats {dtype}",
    )
    for residual, relu in ((True, True), (False, False)):
        flags = {"HAS_RESIDUAL": residual, "RELU": relu, "DENSE_ROWS": dense, "BLOCK_M": 64, "BLOCK_C": 64}
        compiles(
            lambda: tp._normalize_kernel[(1, 2)](yd, yd, yd, v, v, m, c, hw, *s, *s, **flags), f"normalize {dtype}"
        )
        compiles(
            lambda: tp._grad_sums_kernel[(1, 2)](
                yd, yd, yd, yd, v, v, v, v, v, m, c, hw, 128, *s, *s, *s, STORE_MASKED=relu, **flags
            ),
            f"grad_sums {dtype}",
        )
        compiles(
            lambda: tp._grad_input_kernel[(1, 2)](yd, yd, yd, yd, v, v, v, v, v, m, c, hw, *s, *s, *s, **flags),
            f"grad_input {dtype}",
        )
"""


def test_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    assert_compiles(_COMPILE_SCRIPT, expected=4 * 7)


# --- which passes train --------------------------------------------------------------------------------------------


# --- the training Function and modules on the Triton passes (CPU under the interpreter) ------------------------------


@pytest.fixture
def triton_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of each Triton pass, to show that a test trains on them."""
    calls: dict[str, int] = {}
    real = passes.PASSES["triton"]

    def counted(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return getattr(real, name)(*args, **kwargs)

        return call

    names = ("stats", "normalize", "grad_sums", "grad_input")
    monkeypatch.setitem(passes.PASSES, "triton", passes.Passes(*map(counted, names), real.unsupported))
    return calls


@interpreter_only
@pytest.mark.parametrize("conv, residual, relu", [(True, True, True), (True, False, False), (False, True, True)])
def test_gradcheck_on_triton_passes(conv, residual, relu):
    bn = randomize_bn_(nn.BatchNorm2d(3)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True) if conv else None
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) if residual else None
    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)
    config = ConvConfig(padding=(1, 1))

    def fn(x, w, gamma, beta, r):
        return ConvBNActTrain.apply(x, w, gamma, beta, r, None, None, bn, config, relu, None, "triton")[0]

    assert torch.autograd.gradcheck(fn, (x, w, gamma, beta, r), eps=1e-6, atol=1e-7)


@interpreter_only
def test_resnet_training_step_on_triton_matches_torchvision_in_fp64(triton_calls):
    tv = randomize_bn_(torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).double()
    fused = fused_resnet.fuse(tv, backend="triton")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 7])
    got = torch.autograd.grad(F.cross_entropy(fused.train()(x), labels), list(fused.parameters()))
    want = torch.autograd.grad(F.cross_entropy(tv.train()(x), labels), list(tv.parameters()))
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) < 1e-9
    for a, b in zip(fused.buffers(), tv.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert triton_calls["stats"] == sum(isinstance(m, nn.BatchNorm2d) for m in tv.modules())


@interpreter_only
def test_bf16_autocast_training_on_triton_matches_the_pytorch_passes():
    x = torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    results = []
    for backend in ("triton", "cpu"):
        torch.manual_seed(0)
        m = randomize_bn_(ConvBNAct(8, 8, 3, padding=1, backend=backend))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        (grad_x,) = torch.autograd.grad(out.float().square().sum(), [x])
        results.append((out.float(), grad_x, m.bn.running_var.clone()))
    (out_t, gx_t, rv_t), (out_c, gx_c, rv_c) = results
    # Same bf16 conv output y; the passes differ only in rounding: one bf16 ulp (2**-7 relative) at most.
    assert ((out_t - out_c).abs() <= 2.0**-7 * out_c.abs()).all()
    assert relative_error(gx_t, gx_c) < 2.0**-6
    torch.testing.assert_close(rv_t, rv_c, rtol=1e-6, atol=1e-7)


@interpreter_only
def test_eager_training_runs_the_pass_bodies_without_the_ops_dispatch(monkeypatch):
    # Eager: the bodies directly (the op's dispatch cost more host time than the kernels take on a GPU); a
    # dispatch mode, like torch.compile, goes through the ops.
    entered = []
    op_call = type(triton_passes.bn_normalize).__call__

    def watched(op, *args, **kwargs):
        entered.append(str(getattr(op, "_qualname", op)))
        return op_call(op, *args, **kwargs)

    monkeypatch.setattr(type(triton_passes.bn_normalize), "__call__", watched)
    m = randomize_bn_(ConvBNAct(4, 4, 3, padding=1, backend="triton"))
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    m(x).square().sum().backward()
    assert entered == []

    class SeesOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return func(*args, **(kwargs or {}))

    with SeesOps():
        m(x).square().sum().backward()
    names = " ".join(entered)
    for op in ("bn_partial_stats", "bn_normalize", "bn_grad_sums", "bn_grad_input"):
        assert op in names, (op, names)


@interpreter_only
def test_fullgraph_compile_of_triton_training():
    torch._dynamo.reset()
    m = randomize_bn_(ConvBNAct(4, 4, 3, padding=1, backend="triton"))
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    r = torch.randn(2, 4, 6, 6)
    out_c, out_e = compiled(xc, r), eager(xe, r)
    assert relative_error(out_c, out_e) < 1e-6
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    assert relative_error(xc.grad, xe.grad) < 1e-5
    torch.testing.assert_close(m.bn.running_mean, eager.bn.running_mean)
