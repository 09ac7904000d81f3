"""The training passes (fused_resnet/training/passes.py: PyTorch ops, the extension's kernels, Triton) against
fp64 formulas written out here, and which passes each backend trains with.

Every implementation runs on the devices it supports here: "torch" and "cpp" on CPU, "triton" on CPU under the
Triton interpreter (CI); "torch", "cpp" and "triton" on CUDA in the GPU check. The extension's CUDA kernels also
run on CPU tensors in CI, through a host emulation of CUDA's threads (tests/cuda_on_host.py).

Tolerances: the passes accumulate in fp32 (fp64 for fp64), so statistics and sums are compared at a few fp32 ulps
relative to the data's magnitude; outputs stored in bf16/fp16 may differ from the exactly rounded value by one ulp
of the output (a fused multiply-add rounds once where the formula rounds twice).
"""

import types

import pytest
import torch
from cuda_on_host import ROWS_PER_THREAD, THREAD_ORDERS, host_cuda_passes
from cuda_on_host import unavailable as host_cuda_unavailable

from fused_resnet import backends
from fused_resnet.training import passes


def _impl(name: str, device: str) -> object:
    marks = [pytest.mark.gpu] if device == "cuda" else []
    reason = passes._unsupported(name, device, torch.float32) if device == "cpu" else None
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param((passes.PASSES.get(name), device), marks=marks, id=f"{name}-{device}")


def _host_cuda_impl(order: str) -> object:
    reason = host_cuda_unavailable()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param((host_cuda_passes(order), "cpu"), marks=marks, id=f"cuda-kernels-on-host-{order}")


IMPLS = [
    _impl("torch", "cpu"),
    _impl("cpp", "cpu"),
    _impl("triton", "cpu"),
    *(_host_cuda_impl(order) for order in THREAD_ORDERS),
    _impl("torch", "cuda"),
    _impl("cpp", "cuda"),
    _impl("triton", "cuda"),
]
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


def _misaligned_vector(v: torch.Tensor) -> torch.Tensor:
    """The same values as vector v, one element off every 16-byte boundary."""
    view = torch.empty(v.numel() + 1, dtype=v.dtype, device=v.device)[1:].copy_(v)
    assert view.data_ptr() % 16 != 0
    return view


def _with_one_misaligned(vectors: tuple[torch.Tensor, ...]):
    """vectors with each one in turn replaced by a misaligned copy."""
    for i in range(len(vectors)):
        yield vectors[:i] + (_misaligned_vector(vectors[i]),) + vectors[i + 1 :]


def _ch(v: torch.Tensor) -> torch.Tensor:
    return v.double().view(1, -1, 1, 1)


def _within(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> bool:
    """got is want up to a few rounding errors of the accumulation on the terms' magnitudes (cancellation makes
    those larger than the result) plus one rounding to the output dtype."""
    acc_eps = torch.finfo(_acc(got.dtype)).eps
    return bool(((got.double() - want).abs() <= 4 * acc_eps * terms + OUTPUT_ULP[got.dtype] * want.abs()).all())


# --- statistics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_stats_match_var_mean(impl, dtype, fmt):
    run, device = impl
    # |mean| ≫ std: the case where Σx, Σx² statistics lose every digit in fp32.
    y = _tensor((3, 5, 7, 9), dtype, fmt, device, offset=300.0, scale=0.5)
    assert_stats(run.stats(y), y)


def assert_stats(stats, y: torch.Tensor) -> None:
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    eps = torch.finfo(_acc(y.dtype)).eps
    assert torch.equal(stats.count.cpu(), torch.full((y.shape[1],), y.numel() / y.shape[1], dtype=_acc(y.dtype)))
    assert ((stats.mean.double() - mean).abs() <= 8 * eps * mean.abs()).all()
    # Each merged mean is known to an ulp of |mean|; that error enters the variance to first order through the
    # merge's δ² term: |Δvar| ≲ ulp(|mean|)·std, a few of them.
    assert ((stats.m2.double() / stats.count.double() - var).abs() <= 8 * eps * mean.abs() * var.sqrt()).all()


# --- the elementwise passes ---------------------------------------------------------------------------------------


def _z(y, scale, shift, residual, residual_scale=None) -> torch.Tensor:
    z = y.double() * _ch(scale) + _ch(shift)
    if residual is None:
        return z
    return z + residual.double() * (1.0 if residual_scale is None else _ch(residual_scale))


def _z_terms(y, scale, shift, residual, residual_scale=None) -> torch.Tensor:
    absolute = (None if t is None else t.abs() for t in (residual, residual_scale))
    return _z(y.abs(), scale.abs(), shift.abs(), *absolute)


# The residual of a unit: none, a tensor, or a tensor with a per-channel scale (a projection shortcut's raw conv
# output, its BN's scale; passes.py).
RESIDUALS = [None, "plain", "scaled"]


def _residual(kind, shape, dtype, fmt, device):
    """(residual, residual_scale) of this kind."""
    r = None if kind is None else _tensor(shape, dtype, fmt, device)
    return r, _vector(shape[1], dtype, device) if kind == "scaled" else None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("relu", [False, True])
def test_normalize_matches_formula(impl, dtype, fmt, residual, relu):
    run, device = impl
    y = _tensor((2, 6, 5, 3), dtype, fmt, device)
    r, rs = _residual(residual, (2, 6, 5, 3), dtype, FORMATS[1 - FORMATS.index(fmt)], device)
    scale, shift = _vector(6, dtype, device), _vector(6, dtype, device)
    out = run.normalize(y, scale, shift, r, relu, rs)
    z = _z(y, scale, shift, r, rs)
    want = torch.relu(z) if relu else z
    assert out.dtype == dtype and out.stride() == y.stride()
    assert _within(out, want, _z_terms(y, scale, shift, r, rs))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual, relu", [(None, False), ("plain", True), ("scaled", True), (None, True)])
def test_grad_passes_match_formula(impl, dtype, fmt, residual, relu):
    run, device = impl
    shape = (3, 6, 9, 7)  # 189 pixels: several Triton programs, a partial chunk, odd channel tails
    y = _tensor(shape, dtype, fmt, device)
    g = _tensor(shape, dtype, FORMATS[1 - FORMATS.index(fmt)], device)
    r, rs = _residual(residual, shape, dtype, fmt, device)
    scale, shift, mean = (_vector(6, dtype, device) for _ in range(3))
    a, b, c = (_vector(6, dtype, device) for _ in range(3))
    z = _z(y, scale, shift, r, rs)
    g_masked = torch.where(z > 0, g.double(), 0.0) if relu else g.double()

    sum_g, sum_gy, masked = run.grad_sums(g, y, scale, shift, r, mean, relu, True, rs)
    want_g, want_gy = g_masked.sum((0, 2, 3)), (g_masked * (y.double() - _ch(mean))).sum((0, 2, 3))
    # Sums of 189 terms of size ~1 in fp32: a few ulps of the sum of magnitudes.
    bound = 64 * torch.finfo(_acc(dtype)).eps * g.double().abs().sum((0, 2, 3)) * 4
    assert ((sum_g.double() - want_g).abs() <= bound).all()
    assert ((sum_gy.double() - want_gy).abs() <= bound).all()
    assert torch.equal(masked.double(), g_masked)

    dy = run.grad_input(g, y, scale, shift, r, a, b, c, relu, rs)
    want = _ch(a) * g_masked + _ch(b) * y.double() + _ch(c)
    assert dy.dtype == dtype and dy.stride() == y.stride()
    terms = (_ch(a) * g_masked).abs() + (_ch(b) * y.double()).abs() + _ch(c).abs()
    assert _within(dy, want, terms)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_gradient(impl):
    run, device = impl
    # The gradient of a .sum() arrives as an expanded view (all strides 0).
    y = _tensor((2, 4, 3, 3), torch.float32, torch.channels_last, device)
    g = torch.ones((), device=device).expand(y.shape)
    scale, shift, mean = (_vector(4, torch.float32, device) for _ in range(3))
    sum_g, _, masked = run.grad_sums(g, y, scale, shift, None, mean, True, True)
    mask = _z(y, scale, shift, None) > 0
    assert torch.equal(sum_g.double(), mask.double().sum((0, 2, 3)))
    assert torch.equal(masked.bool(), mask)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values as channels_last t, one element off every 16-byte boundary."""
    n, c, h, w = t.shape
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2).copy_(t)
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() % 16 != 0
    return view


# csrc/cuda/bn_train.cu's kernels: on the GPU through the extension, and on CPU tensors through the host emulation
# in each order of a block's threads.
_NO_HOST = pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers for the host emulation")
# The 16-byte kernels' rows per thread (launch.h: set_bn_rows_per_thread) are swept here in forward order.
CUDA_KERNELS = (
    [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
    + [pytest.param(f"cuda-{rows}", marks=pytest.mark.gpu, id=f"cuda-rows{rows}") for rows in ROWS_PER_THREAD[1:]]
    + [pytest.param(f"host-{order}", marks=_NO_HOST, id=f"host-{order}") for order in THREAD_ORDERS]
    + [pytest.param(f"host-forward-{rows}", marks=_NO_HOST, id=f"host-rows{rows}") for rows in ROWS_PER_THREAD[1:]]
)


def _cuda_kernels(where: str, dtype: torch.dtype) -> tuple[passes.Passes, str]:
    if where.startswith("host-"):
        order, _, rows = where.removeprefix("host-").partition("-")
        return host_cuda_passes(order, int(rows or 1)), "cpu"
    reason = passes._unsupported("cpp", "cuda", dtype)
    if reason is not None:
        pytest.skip(reason)
    _, _, rows = where.partition("-")
    return _with_rows_per_thread(passes.PASSES["cpp"], int(rows or 1)), "cuda"


def _with_rows_per_thread(run: passes.Passes, rows: int) -> passes.Passes:
    """run's passes with the extension's CUDA kernels set to `rows` rows per thread for each call."""
    from fused_resnet.ops.cpp_backend import _C

    def configured(fn):
        def call(*args):
            previous = _C.bn_rows_per_thread()
            _C.set_bn_rows_per_thread(rows)
            try:
                return fn(*args)
            finally:
                _C.set_bn_rows_per_thread(previous)

        return call

    return passes.Passes(*(configured(fn) for fn in (run.stats, run.normalize, run.grad_sums, run.grad_input)),
                         run.unsupported)  # fmt: skip


@pytest.mark.parametrize("where", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [8, 40, 64, 264, 2048])
def test_cuda_vectorized_passes(where, dtype, channels):
    # csrc/cuda/bn_train.cu runs every pass 16 bytes per access where the channels are a multiple of the vector
    # width and every tensor is aligned (264 channels of 16-bit values: 33 vectors, a second block of channel
    # vectors with one active column); misaligned copies of the same tensors take the scalar kernels, and so does a
    # misaligned per-channel vector (the 16-byte kernels read those 16 bytes at a time too). The
    # elementwise passes do the same arithmetic per value in both: bit for bit equal. The reductions sum in another
    # order: both must match the formulas.
    run, device = _cuda_kernels(where, dtype)
    shape = (3, channels, 9, 7)  # 189 pixels: the last block of pixel rows and the last chunk are partial
    y, g, r = (_tensor(shape, dtype, torch.channels_last, device) for _ in range(3))
    scale, shift, mean, a, b, c, rs = (_vector(channels, dtype, device) for _ in range(7))
    y_stats = _tensor(shape, dtype, torch.channels_last, device, offset=300.0, scale=0.5)
    assert_stats(run.stats(y_stats), y_stats)
    assert_stats(run.stats(_misaligned(y_stats)), y_stats)
    for residual, r_scale in ((None, None), (r, None), (r, rs)):
        res_mis = None if residual is None else _misaligned(residual)
        z = _z(y, scale, shift, residual, r_scale)
        out = run.normalize(y, scale, shift, residual, True, r_scale)
        assert torch.equal(out, run.normalize(_misaligned(y), scale, shift, res_mis, True, r_scale))
        # The misaligned per-channel vectors: once per test, at the smaller widths (the emulation is slow).
        vectors_too = residual is None and channels < 2048
        for s_in, t_in in _with_one_misaligned((scale, shift)) if vectors_too else ():
            assert torch.equal(out, run.normalize(y, s_in, t_in, residual, True))
        if r_scale is not None and channels < 2048:
            assert torch.equal(out, run.normalize(y, scale, shift, residual, True, _misaligned_vector(r_scale)))
        assert _within(out, torch.relu(z), _z_terms(y, scale, shift, residual, r_scale))

        g_masked = torch.where(z > 0, g.double(), 0.0)
        want_g, want_gy = g_masked.sum((0, 2, 3)), (g_masked * (y.double() - _ch(mean))).sum((0, 2, 3))
        bound = 256 * torch.finfo(_acc(dtype)).eps * g.double().abs().sum((0, 2, 3))
        aligned = (scale, shift, mean)
        for g_in, y_in, r_in, (s_in, t_in, m_in) in (
            (g, y, residual, aligned),
            (_misaligned(g), _misaligned(y), res_mis, aligned),
            *((g, y, residual, vectors) for vectors in (_with_one_misaligned(aligned) if vectors_too else ())),
        ):
            sum_g, sum_gy, masked = run.grad_sums(g_in, y_in, s_in, t_in, r_in, m_in, True, True, r_scale)
            assert ((sum_g.double() - want_g).abs() <= bound).all()
            assert ((sum_gy.double() - want_gy).abs() <= bound).all()
            assert torch.equal(masked.double(), g_masked)
        if r_scale is not None and channels < 2048:  # a misaligned residual scale: the scalar kernels
            masked = run.grad_sums(g, y, scale, shift, residual, mean, True, True, _misaligned_vector(r_scale))[2]
            assert torch.equal(masked.double(), g_masked)

        dy = run.grad_input(g, y, scale, shift, residual, a, b, c, True, r_scale)
        misaligned_dy = run.grad_input(_misaligned(g), _misaligned(y), scale, shift, res_mis, a, b, c, True, r_scale)
        assert torch.equal(dy, misaligned_dy)
        for vectors in _with_one_misaligned((scale, shift, a, b, c)) if vectors_too else ():
            assert torch.equal(dy, run.grad_input(g, y, *vectors[:2], residual, *vectors[2:], True))
        terms = (_ch(a) * g_masked).abs() + (_ch(b) * y.double()).abs() + _ch(c).abs()
        assert _within(dy, _ch(a) * g_masked + _ch(b) * y.double() + _ch(c), terms)


@pytest.mark.parametrize(
    "where, shape",
    [
        # 2×512×520 pixels of 64 channels: the elementwise kernels' grid-stride loops go round more than once (4
        # rounds at one row per thread: of 4,160 blocks × 32 pixel lanes in bf16, 8,320 × 16 in fp32) and each
        # statistics lane merges several batches into its running triple.
        pytest.param("cuda", (2, 64, 512, 520), marks=pytest.mark.gpu, id="cuda"),
        *(
            pytest.param(f"cuda-{rows}", (2, 64, 512, 520), marks=pytest.mark.gpu, id=f"cuda-rows{rows}")
            for rows in ROWS_PER_THREAD[1:]
        ),
        # 4,160 pixels of 16 channels, emulated with smaller grid limits (bn_train.cu): 44 chunks of 95 rows, more
        # than the merge lanes (3 rounds of their batches, the last part full), and elementwise grid-stride loops
        # that go round 16 times.
        *(
            pytest.param(f"host-{order}", (2, 16, 40, 52), marks=_NO_HOST, id=f"host-{order}")
            for order in THREAD_ORDERS
        ),
        *(
            pytest.param(f"host-forward-{rows}", (2, 16, 40, 52), marks=_NO_HOST, id=f"host-rows{rows}")
            for rows in ROWS_PER_THREAD[1:]
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("relu", [True, False])
def test_cuda_vectorized_passes_over_many_rows(where, shape, dtype, relu):
    run, device = _cuda_kernels(where, dtype)
    channels = shape[1]
    y, g, r = (_tensor(shape, dtype, torch.channels_last, device) for _ in range(3))
    scale, shift, mean, a, b, c = (_vector(channels, dtype, device) for _ in range(6))
    rs = _vector(channels, dtype, device) if relu else None  # with a ReLU, a projection block end's scaled residual
    y_stats = _tensor(shape, dtype, torch.channels_last, device, offset=300.0, scale=0.5)
    assert_stats(run.stats(y_stats), y_stats)
    z = _z(y, scale, shift, r, rs)
    out = run.normalize(y, scale, shift, r, relu, rs)
    assert _within(out, torch.relu(z) if relu else z, _z_terms(y, scale, shift, r, rs))
    g_masked = torch.where(z > 0, g.double(), 0.0) if relu else g.double()
    sum_g, sum_gy, masked = run.grad_sums(g, y, scale, shift, r, mean, relu, True, rs)
    bound = 256 * torch.finfo(_acc(dtype)).eps * g.double().abs().sum((0, 2, 3))
    assert ((sum_g.double() - g_masked.sum((0, 2, 3))).abs() <= bound).all()
    assert ((sum_gy.double() - (g_masked * (y.double() - _ch(mean))).sum((0, 2, 3))).abs() <= bound).all()
    assert torch.equal(masked.double(), g_masked)
    dy = run.grad_input(g, y, scale, shift, r, a, b, c, relu, rs)
    terms = (_ch(a) * g_masked).abs() + (_ch(b) * y.double()).abs() + _ch(c).abs()
    assert _within(dy, _ch(a) * g_masked + _ch(b) * y.double() + _ch(c), terms)


@pytest.mark.parametrize(
    "where, shape",
    [
        pytest.param("cuda", (2, 64, 512, 520), marks=pytest.mark.gpu, id="cuda"),
        pytest.param("host-forward", (2, 16, 40, 52), marks=_NO_HOST, id="host"),
    ],
)
@pytest.mark.parametrize("rows", ROWS_PER_THREAD[1:])
def test_rows_per_thread_change_no_bit(where, shape, rows):
    # More rows per thread only regroups the loads: every value gets the same arithmetic and each thread sums its
    # rows in the same order, so every output, the sums included, is bit for bit the one-row kernels'. The shapes
    # take the grid-stride loops round several times, with partial rounds (emulated: smaller grid limits).
    (one, device), (more, _) = _cuda_kernels(where, torch.bfloat16), _cuda_kernels(f"{where}-{rows}", torch.bfloat16)
    c = shape[1]
    y, g, r = (_tensor(shape, torch.bfloat16, torch.channels_last, device) for _ in range(3))
    scale, shift, mean, a, b, cc, rs = (_vector(c, torch.bfloat16, device) for _ in range(7))
    for r_scale in (None, rs):
        assert torch.equal(
            one.normalize(y, scale, shift, r, True, r_scale), more.normalize(y, scale, shift, r, True, r_scale)
        )
        sums = [run.grad_sums(g, y, scale, shift, r, mean, True, True, r_scale) for run in (one, more)]
        assert all(torch.equal(x, z) for x, z in zip(*sums, strict=True))
        dys = [run.grad_input(g, y, scale, shift, r, a, b, cc, True, r_scale) for run in (one, more)]
        assert torch.equal(*dys)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_extension_ops_opcheck(device):
    reason = passes._unsupported("cpp", device, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    ops = torch.ops.fused_resnet_C
    y, g, r = (_tensor((2, 5, 3, 4), torch.float32, torch.channels_last, device) for _ in range(3))
    v = [_vector(5, torch.float32, device) for _ in range(6)]
    torch.library.opcheck(ops.bn_stats.default, (y,))
    torch.library.opcheck(ops.bn_normalize.default, (y, v[0], v[1], r, True))
    torch.library.opcheck(ops.bn_grad_sums.default, (g, y, v[0], v[1], r, v[2], True, True))
    torch.library.opcheck(ops.bn_grad_sums.default, (g, y, v[0], v[1], None, v[2], True, False))
    torch.library.opcheck(ops.bn_grad_input.default, (g, y, v[0], v[1], r, v[3], v[4], v[5], True))


# --- which passes train ------------------------------------------------------------------------------------------


def test_passes_for_each_backend(monkeypatch):
    cpu = torch.empty(1, 1, 1, 1)
    cpp_runs = passes._unsupported("cpp", "cpu", torch.float32) is None
    assert passes.passes_for("cpu", cpu) == "cpp"
    assert passes.passes_for("auto", cpu) == ("cpp" if cpp_runs else "torch")
    assert passes.passes_for("reference", cpu) == "torch"
    with pytest.raises(backends.BackendError, match="'cuda' backend runs cuda tensors"):
        passes.passes_for("cuda", cpu)
    assert passes.passes_for("cuda", cpu, allow_fallback=True) == "torch"
    cuda_tensor = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed to choose
    monkeypatch.setattr(passes, "_unsupported", lambda name, device_type, dtype: None)
    assert passes.passes_for("cuda", cuda_tensor) == "cpp"
    assert passes.passes_for("auto", cuda_tensor) == "cpp"  # measured faster than Triton's on an H200
    assert passes.passes_for("triton", cuda_tensor) == "triton"
    monkeypatch.setattr(passes, "_unsupported", lambda name, device_type, dtype: "no" if name == "cpp" else None)
    assert passes.passes_for("auto", cuda_tensor) == "triton"  # without the extension's CUDA part
    monkeypatch.setattr(passes, "_unsupported", lambda name, device_type, dtype: None)
    monkeypatch.setattr(passes, "_unsupported", lambda name, device_type, dtype: f"no {name} here")
    for backend, name in (("triton", "triton"), ("cpu", "cpp")):
        with pytest.raises(backends.BackendError, match=f"'{backend}' backend cannot train here: no {name} here"):
            passes.passes_for(backend, cpu)
        assert passes.passes_for(backend, cpu, allow_fallback=True) == "torch"
    assert passes.passes_for("auto", cpu) == "torch"
