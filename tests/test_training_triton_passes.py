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
from torch import nn
from torchvision.models.resnet import BasicBlock

import fused_resnet
from fused_resnet import ConvBNAct, backends
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
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORMATS = [torch.contiguous_format, torch.channels_last]
# One ulp of the output dtype, relative to the result.
OUTPUT_ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(shape, dtype, fmt, device, offset=0.0, scale=1.0) -> torch.Tensor:
    t = torch.randn(shape, dtype=torch.float64) * scale + offset
    return t.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def _vector(c: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(c, dtype=torch.float64).to(device=device, dtype=_acc(dtype))


def _ch(v: torch.Tensor) -> torch.Tensor:
    return v.double().view(1, -1, 1, 1)


def _within(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> bool:
    """got is want up to a few rounding errors of the accumulation on the terms' magnitudes (cancellation makes
    those larger than the result) plus one rounding to the output dtype."""
    acc_eps = torch.finfo(_acc(got.dtype)).eps
    return bool(((got.double() - want).abs() <= 4 * acc_eps * terms + OUTPUT_ULP[got.dtype] * want.abs()).all())


# --- statistics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [64, 128, None])  # one chunk per program, several, the launcher's choice
def test_stats_match_var_mean(device, dtype, fmt, rows):
    # |mean| ≫ std: the case where Σx, Σx² statistics lose every digit in fp32.
    y = _tensor((3, 5, 7, 9), dtype, fmt, device, offset=300.0, scale=0.5)
    stats = triton_passes.batch_stats(y, rows)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    eps = torch.finfo(_acc(dtype)).eps
    assert torch.equal(stats.count.cpu(), torch.full((5,), 3.0 * 7 * 9, dtype=_acc(dtype)))
    assert (stats.mean.double() - mean).abs().max() <= 8 * eps * 300
    # Each merged mean is known to an ulp of |mean|; that error enters the variance to first order through the
    # merge's δ² term: |Δvar| ≲ ulp(|mean|)·std, a few of them.
    assert ((stats.m2.double() / stats.count.double() - var).abs() <= 8 * eps * mean.abs() * var.sqrt()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_stats_of_a_strided_view(device):
    # Every other row: h and w no longer collapse into one index, so the launcher copies first.
    y = _tensor((2, 4, 10, 6), torch.float32, torch.channels_last, device)[:, :, ::2]
    stats = triton_passes.batch_stats(y)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert relative_error(stats.mean, mean) < 1e-6
    assert relative_error(stats.m2 / stats.count, var) < 1e-6


# --- the elementwise passes ---------------------------------------------------------------------------------------


def _z(y, scale, shift, residual) -> torch.Tensor:
    z = y.double() * _ch(scale) + _ch(shift)
    return z if residual is None else z + residual.double()


def _z_terms(y, scale, shift, residual) -> torch.Tensor:
    return _z(y.abs(), scale.abs(), shift.abs(), None if residual is None else residual.abs())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, False), (True, True)])
def test_normalize_matches_formula(device, dtype, fmt, residual, relu):
    y = _tensor((2, 6, 5, 3), dtype, fmt, device)
    r = _tensor((2, 6, 5, 3), dtype, FORMATS[1 - FORMATS.index(fmt)], device) if residual else None
    scale, shift = _vector(6, dtype, device), _vector(6, dtype, device)
    out = triton_passes.bn_normalize(y, scale, shift, r, relu)
    z = _z(y, scale, shift, r)
    want = torch.relu(z) if relu else z
    assert out.dtype == dtype and out.stride() == y.stride()
    assert _within(out, want, _z_terms(y, scale, shift, r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual, relu", [(False, False), (True, True), (False, True)])
def test_grad_passes_match_formula(device, dtype, fmt, residual, relu):
    shape = (3, 6, 9, 7)  # 189 rows: several programs and a partial chunk
    y = _tensor(shape, dtype, fmt, device)
    g = _tensor(shape, dtype, FORMATS[1 - FORMATS.index(fmt)], device)
    r = _tensor(shape, dtype, fmt, device) if residual else None
    scale, shift, mean = (_vector(6, dtype, device) for _ in range(3))
    a, b, c = (_vector(6, dtype, device) for _ in range(3))
    z = _z(y, scale, shift, r)
    g_masked = torch.where(z > 0, g.double(), 0.0) if relu else g.double()

    sum_g, sum_gy, masked = triton_passes.grad_sums(g, y, scale, shift, r, mean, relu, store_masked=True)
    want_g, want_gy = g_masked.sum((0, 2, 3)), (g_masked * (y.double() - _ch(mean))).sum((0, 2, 3))
    # Sums of 189 terms of size ~1 in fp32: a few ulps of the sum of magnitudes.
    bound = 64 * torch.finfo(_acc(dtype)).eps * g.double().abs().sum((0, 2, 3)) * 4
    assert ((sum_g.double() - want_g).abs() <= bound).all()
    assert ((sum_gy.double() - want_gy).abs() <= bound).all()
    assert torch.equal(masked.double(), g_masked) and masked.stride() == y.stride()

    dy = triton_passes.bn_grad_input(g, y, scale, shift, r, a, b, c, relu)
    want = _ch(a) * g_masked + _ch(b) * y.double() + _ch(c)
    assert dy.dtype == dtype and dy.stride() == y.stride()
    terms = (_ch(a) * g_masked).abs() + (_ch(b) * y.double()).abs() + _ch(c).abs()
    assert _within(dy, want, terms)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_gradient(device):
    # The gradient of a .sum() arrives as an expanded view (all strides 0).
    y = _tensor((2, 4, 3, 3), torch.float32, torch.channels_last, device)
    g = torch.ones((), device=device).expand(y.shape)
    scale, shift, mean = (_vector(4, torch.float32, device) for _ in range(3))
    sum_g, _, masked = triton_passes.grad_sums(g, y, scale, shift, None, mean, True, store_masked=True)
    mask = _z(y, scale, shift, None) > 0
    assert torch.equal(sum_g.double(), mask.double().sum((0, 2, 3)))
    assert torch.equal(masked.bool(), mask)


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


def test_passes_for_each_backend(monkeypatch):
    cpu = torch.empty(1, 1, 1, 1)
    assert passes.passes_for("cpu", cpu) == "torch"
    assert passes.passes_for("reference", cpu) == "torch"
    assert passes.passes_for("auto", cpu) == "torch"  # CPU training keeps PyTorch ops unless asked for Triton
    monkeypatch.setattr(passes, "_triton_unsupported", lambda device_type, dtype: "no GPU here")
    with pytest.raises(backends.BackendError, match="'triton' backend cannot train here: no GPU here"):
        passes.passes_for("triton", cpu)
    assert passes.passes_for("triton", cpu, allow_fallback=True) == "torch"


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
