"""The extension's ops (torch.ops.fused_resnet_C.*, CPU and CUDA kernels) against named references.

conv_bias_act is compared with `reference.conv_bias_act` evaluated in float64 (CPU) or float32 with TF32 off
(CUDA, i.e. cuDNN) on the same rounded inputs; bias_residual_relu with the same arithmetic in plain torch.

Tolerances: `tolerances.forward_rtol(dtype, device)` on the relative-norm error. One layer with fp32
accumulation rounds its output once (bf16: ≤ 2^-9 per element, fp16: 2^-12, fp32: 2^-24) plus, with the
prologue, its rounded input once more, so its error sits far below those whole-network budgets (bf16 4e-2,
fp16 5e-3, fp32 1e-5, TF32 5e-3, fp64 1e-10); a wrong term (bias, residual, a tap, a channel group) shows as
an O(1) error. The measured cuDNN error is printed beside ours when a CUDA case fails.

Without the extension these tests skip, unless FUSED_RESNET_REQUIRE_EXT=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fused_resnet import tolerances
from fused_resnet.ops import reference
from fused_resnet.ops.conv_config import ConvConfig

REQUIRE_EXT = os.environ.get("FUSED_RESNET_REQUIRE_EXT", "0") not in ("", "0")

from fused_resnet.ops import cpp_backend  # noqa: E402  (raises ExtensionMismatchError for a stale build)

if cpp_backend._C is None:
    if REQUIRE_EXT:
        raise RuntimeError(f"FUSED_RESNET_REQUIRE_EXT=1 but {cpp_backend._MISSING}")
    pytest.skip(cpp_backend._MISSING, allow_module_level=True)

_C = cpp_backend._C
ops = torch.ops.fused_resnet_C


@pytest.fixture(autouse=True)
def _hand_written_engine():
    # These tests cover the CUDA op's hand-written engine; the Hopper one (the default on an H100/H200) has
    # tests/test_cuda_sm90_engine.py.
    with cpp_backend.using_cuda_engine("mma"):
        yield


HAS_CUDA = _C.has_cuda() and torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and _C built with CUDA")

# The conv kinds of the ResNet family at tiny, odd sizes: (Cin, Cout, kernel, stride, padding, dilation, groups).
CONV_KINDS = {
    "stem7x7s2": (3, 8, 7, 2, 3, 1, 1),
    "3x3s1": (8, 12, 3, 1, 1, 1, 1),
    "3x3s2": (8, 16, 3, 2, 1, 1, 1),
    "1x1s1": (12, 8, 1, 1, 0, 1, 1),
    "1x1s2": (8, 16, 1, 2, 0, 1, 1),
    "grouped3x3": (16, 16, 3, 1, 1, 1, 4),
    "grouped3x3s2": (16, 32, 3, 2, 1, 1, 8),
    "dilated3x3d2": (8, 8, 3, 1, 2, 2, 1),
    "dilated3x3d4": (8, 8, 3, 1, 4, 4, 1),
}
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
# (residual, relu, prologue)
EPILOGUES = [(False, True, False), (True, True, False), (False, False, False), (True, False, True), (True, True, True)]


def _make(kind, dtype, device="cpu", n=2, hw=(11, 9), residual=True, prologue=False, channels_last=True, seed=0):
    """Inputs for one conv_bias_act call: (x, weight, bias, residual, config, in_scale, in_shift)."""
    cin, cout, k, stride, padding, dilation, groups = kind
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=g)
    weight = torch.randn(cout, cin // groups, k, k, generator=g) * (2.0 / (cin // groups * k * k)) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.1
    config = ConvConfig((stride, stride), (padding, padding), (dilation, dilation), groups)
    r = torch.randn(config.output_shape(x, weight), generator=g) if residual else None
    in_scale = torch.rand(cin, generator=g) + 0.5 if prologue else None
    in_shift = torch.randn(cin, generator=g) * 0.2 if prologue else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def activation(t):
        return None if t is None else t.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    def per_channel(t):
        return None if t is None else t.to(device)

    return (
        activation(x), activation(weight), per_channel(bias), activation(r), config, per_channel(in_scale),
        per_channel(in_shift),
    )  # fmt: skip


def _reference(x, weight, bias, r, config, relu, in_scale, in_shift, dtype):
    """reference.conv_bias_act in `dtype` on the (already rounded) inputs."""

    def up(t):
        return None if t is None else t.to(dtype)

    return reference.conv_bias_act(up(x), up(weight), up(bias), up(r), config, relu, up(in_scale), up(in_shift))


def _canonical_strides(shape):
    return torch.empty(shape, memory_format=torch.channels_last, device="meta").stride()


def _call(x, weight, bias, r, config, relu, in_scale, in_shift):
    return cpp_backend.conv_bias_act(x, weight, bias, r, config, relu, in_scale, in_shift)


# ---------------------------------------------------------------------------------------------------------
# CPU: conv_bias_act
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "res{}-relu{}-pre{}".format(*map(int, e)))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", CONV_KINDS.values(), ids=CONV_KINDS.keys())
def test_conv_bias_act_cpu_matches_reference(kind, dtype, epilogue):
    residual, relu, prologue = epilogue
    x, w, b, r, config, s, t = _make(kind, dtype, residual=residual, prologue=prologue)
    out = _call(x, w, b, r, config, relu, s, t)
    expected = _reference(x, w, b, r, config, relu, s, t, torch.float64)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.stride() == _canonical_strides(out.shape)
    err = tolerances.relative_error(out, expected)
    assert err <= tolerances.forward_rtol(dtype), (
        f"relative error {err:.2e}, max abs {tolerances.max_abs_error(out, expected):.2e}"
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", ["3x3s2", "grouped3x3", "stem7x7s2"])
def test_conv_bias_act_cpu_any_input_layout(kind, dtype):
    """NCHW-contiguous, channels_last, sliced (offset, misaligned) and size-1 spatial inputs all work."""
    x, w, b, r, config, s, t = _make(CONV_KINDS[kind], dtype, channels_last=False, prologue=True)
    expected = _reference(x, w, b, r, config, True, s, t, torch.float64)
    rtol = tolerances.forward_rtol(dtype)
    assert tolerances.relative_error(_call(x, w, b, r, config, True, s, t), expected) <= rtol
    big = torch.randn(x.numel() + 1, dtype=dtype)
    x_offset = big[1:].view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2).copy_(x)
    assert x_offset.data_ptr() % 16 != 0
    assert tolerances.relative_error(_call(x_offset, w, b, r, config, True, s, t), expected) <= rtol
    x1, w1, b1, r1, config1, s1, t1 = _make(CONV_KINDS[kind], dtype, hw=(1, 1) if kind == "1x1s1" else (5, 5), n=1)
    out = _call(x1, w1, b1, r1, config1, True, s1, t1)
    assert out.stride() == _canonical_strides(out.shape)
    assert tolerances.relative_error(out, _reference(x1, w1, b1, r1, config1, True, s1, t1, torch.float64)) <= rtol


@pytest.mark.parametrize("into_residual", [False, True])
@pytest.mark.parametrize("bias_kind", ["strided", "expanded"])
def test_conv_bias_act_cpu_reads_a_bias_of_any_strides(bias_kind, into_residual):
    # An audit: a strided fp32 bias reached oneDNN as it was, which read its memory as dense (1.25 off); an expanded
    # one read past its storage.
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32, prologue=False)
    b = torch.stack([b, -b], dim=1)[:, 0] if bias_kind == "strided" else torch.full((1,), 0.5).expand(b.shape[0])
    expected = _reference(x, w, b, r, config, True, s, t, torch.float64)
    if into_residual:
        with torch.no_grad():
            out = cpp_backend.conv_bias_act_into_residual(x, w, b, r.clone(), config, True)
    else:
        out = _call(x, w, b, r, config, True, s, t)
    assert tolerances.relative_error(out, expected) <= tolerances.forward_rtol(torch.float32)


def test_a_conv_config_refuses_a_stride_of_zero():
    with pytest.raises(ValueError, match="stride"):
        ConvConfig((0, 1))
    with pytest.raises(ValueError, match="padding"):
        ConvConfig(padding=(-1, 0))


def test_conv_bias_act_cpu_empty_batch():
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32, n=0, residual=False)
    out = _call(x, w, b, r, config, True, s, t)
    assert out.shape == (0, 12, 11, 9) and out.stride() == _canonical_strides(out.shape)


def test_conv_bias_act_cpu_weight_cache_sees_in_place_updates():
    """The prepacked-weight cache must never serve a weight that changed since it was packed."""
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32)
    _C.clear_weight_cache()
    cpp_backend.allow_prepacking(w)
    first = _call(x, w, b, r, config, True, s, t)
    assert _C.weight_cache_size() == 1
    with torch.no_grad():
        w.mul_(-1.0)  # bumps the version counter
    second = _call(x, w, b, r, config, True, s, t)
    expected = _reference(x, w, b, r, config, True, s, t, torch.float64)
    assert tolerances.relative_error(second, expected) <= tolerances.forward_rtol(torch.float32)
    assert not torch.allclose(first, second)
    fresh = torch.randn_like(w)  # same shape, maybe the same address once `w` is freed: must not hit
    del w
    cpp_backend.allow_prepacking(fresh)
    third = _call(x, fresh, b, r, config, True, s, t)
    expected = _reference(x, fresh, b, r, config, True, s, t, torch.float64)
    assert tolerances.relative_error(third, expected) <= tolerances.forward_rtol(torch.float32)
    with torch.inference_mode():  # inference tensors have no version counter: never cached, still right
        w_inf = fresh.clone()
        out = _call(x, w_inf, b, r, config, True, s, t)
        w_inf.mul_(0.5)
        out_half = _call(x, w_inf, b, r, config, True, s, t)
    assert tolerances.relative_error(out_half, _reference(x, w_inf, b, r, config, True, s, t, torch.float64)) <= 1e-5
    assert not torch.allclose(out, out_half)
    _C.clear_weight_cache()
    assert _C.weight_cache_size() == 0


def test_weight_cache_keeps_only_declared_weights():
    # A buffer that a compiled graph reuses is rewritten without a version bump (as `.data` writes are): only
    # weights the package declared stable (its folds) may be cached.
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32)
    _C.clear_weight_cache()
    _call(x, w, b, r, config, True, s, t)
    w.data.mul_(-1.0)
    assert _C.weight_cache_size() == 0
    expected = _reference(x, w, b, r, config, True, s, t, torch.float64)
    assert tolerances.relative_error(_call(x, w, b, r, config, True, s, t), expected) <= 1e-5


def test_eval_folds_are_declared_and_cached():
    from fused_resnet import ConvBNAct

    _C.clear_weight_cache()
    m = ConvBNAct(8, 8, 3, padding=1, backend="cpu").eval()
    with torch.no_grad():
        m(torch.randn(1, 8, 5, 5))
    assert _C.weight_cache_size() == 1
    _C.clear_weight_cache()


# ---------------------------------------------------------------------------------------------------------
# CPU: conv_bias_act_into_residual (the result written into the residual's memory)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["3x3s1", "1x1s2", "grouped3x3", "stem7x7s2"])
def test_into_residual_writes_conv_bias_act_into_the_residual(kind, dtype, relu):
    # float64 and grouped convs have no in-place oneDNN path: they compute into a new buffer, then copy.
    x, w, b, r, config, s, t = _make(CONV_KINDS[kind], dtype, prologue=kind == "3x3s1")
    want = _call(x, w, b, r, config, relu, s, t)
    target = r.clone()
    out = cpp_backend.conv_bias_act_into_residual(x, w, b, target, config, relu, s, t)
    assert out.data_ptr() == target.data_ptr() and out.stride() == r.stride()
    torch.testing.assert_close(out, want, rtol=tolerances.forward_rtol(dtype), atol=0)


@pytest.mark.parametrize("layout", ["nchw", "aliases_x"])
def test_into_residual_when_the_residual_cannot_take_the_output_directly(layout):
    x, w, b, _, config, s, t = _make((8, 8, 1, 1, 0, 1, 1), torch.float32, residual=False)
    r = x.contiguous() if layout == "nchw" else x  # a 1x1 conv whose residual is its own input
    want = _call(x.clone(), w, b, r.clone(), config, True, s, t)
    out = cpp_backend.conv_bias_act_into_residual(x, w, b, r, config, True, s, t)
    assert out.data_ptr() == r.data_ptr()
    torch.testing.assert_close(out, want)


def test_into_residual_opcheck_cpu():
    args = _op_args(CONV_KINDS["3x3s1"], torch.float32, "cpu", True, False, True, requires_grad=False)
    torch.library.opcheck(ops.conv_bias_act_into_residual.default, args)


# ---------------------------------------------------------------------------------------------------------
# CPU: bias_residual_relu
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 5, 3), (1, 64, 4, 4), (3, 1, 2, 7)])
def test_bias_residual_relu_cpu_matches_torch(shape, dtype, residual, relu):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(shape, generator=g).to(dtype)
    bias = torch.randn(shape[1], generator=g)
    r = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last) if residual else None
    out = cpp_backend.bias_residual_relu(y, bias, r, relu)
    # The same arithmetic: ((y + b) + r) in fp32 (fp64 for fp64), relu, one rounding.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = y.to(acc) + bias.to(acc).view(1, -1, 1, 1)
    if residual:
        expected = expected + r.to(acc)
    expected = (torch.relu(expected) if relu else expected).to(dtype)
    assert out.stride() == _canonical_strides(shape)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bias_residual_relu_keeps_nan():
    y = torch.tensor([float("nan"), -1.0, 2.0]).view(1, 3, 1, 1)
    out = cpp_backend.bias_residual_relu(y, torch.zeros(3), None, True)
    assert torch.isnan(out[0, 0]).all() and out[0, 1].item() == 0.0 and out[0, 2].item() == 2.0


@pytest.mark.parametrize("into_residual", [False, True])
@pytest.mark.parametrize("where", ["input", "inf_input", "weight", "bias", "residual", "prologue"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["3x3s1", "grouped3x3"])
def test_conv_bias_act_cpu_keeps_nan(kind, dtype, where, into_residual):
    # oneDNN's ReLU post-op makes a NaN 0; torch.relu keeps it, and so must the op (an audit found a NaN input pixel
    # giving finite logits through the cpu backend). The NaN pattern must be the reference's exactly.
    x, w, b, r, config, s, t = _make(CONV_KINDS[kind], dtype, prologue=where == "prologue")
    target = {"input": x, "inf_input": x, "weight": w, "bias": b, "residual": r, "prologue": s}[where]
    if where == "inf_input":  # +inf and -inf in one pixel: their products meet in the same sums (inf - inf)
        target[0, 0, 1, 1], target[0, 1, 1, 1] = float("inf"), float("-inf")
    else:
        target[(0, 0, 1, 1)[: target.dim()]] = float("nan")
    want = _reference(x, w, b, r, config, True, s, t, torch.float64)
    if into_residual:
        out = cpp_backend.conv_bias_act_into_residual(x, w, b, r.clone(), config, True, s, t)
    else:
        out = _call(x, w, b, r, config, True, s, t)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    finite = torch.isfinite(want)
    err = tolerances.relative_error(out[finite], want[finite])
    assert err <= tolerances.forward_rtol(dtype)


# ---------------------------------------------------------------------------------------------------------
# Input checks: errors a user can act on
# ---------------------------------------------------------------------------------------------------------
def _args(**change):
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32, prologue=True)
    args = dict(x=x, weight=w, bias=b, residual=r, in_scale=s, in_shift=t, stride=[1, 1], padding=[1, 1])
    args.update(dilation=[1, 1], groups=1, relu=True)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(2, 8, 11)), "4-D"),
        (dict(x=torch.randint(0, 3, (2, 8, 11, 9))), "floating point"),
        (dict(weight=torch.randn(12, 8, 3, 3, dtype=torch.float64)), "must match the input dtype"),
        (dict(weight=torch.randn(12, 5, 3, 3)), "input has 8 channels but the weight expects 5"),
        (dict(bias=torch.randn(11)), r"bias must have shape \(12,\)"),
        (dict(bias=torch.randn(12, dtype=torch.float16)), "bias must be float32"),
        (dict(residual=torch.randn(2, 12, 11, 8)), "residual must have the output shape"),
        (dict(residual=torch.randn(2, 12, 11, 9, dtype=torch.float64)), "residual dtype"),
        (dict(in_shift=None), "in_scale and in_shift come together"),
        (dict(in_scale=torch.ones(7)), r"in_scale must have shape \(8,\)"),
        (dict(stride=[1]), "stride must have 2 values"),
        (dict(stride=[0, 1]), "stride must be >= 1"),
        (dict(padding=[-1, 0]), "padding must be >= 0"),
        (dict(groups=0), "groups must be >= 1"),
        (dict(groups=3), "input has 8 channels but the weight expects 24"),
        (dict(x=torch.randn(2, 8, 1, 1), residual=None, padding=[0, 0]), "too small"),
    ],
)
def test_conv_bias_act_input_errors(change, message):
    with pytest.raises(RuntimeError, match=message):
        ops.conv_bias_act(**_args(**change))


def test_bias_residual_relu_input_errors():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        ops.bias_residual_relu(y, torch.zeros(5), None, True)
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        ops.bias_residual_relu(y, torch.zeros(4), torch.randn(2, 4, 3, 2), True)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.bias_residual_relu(torch.randn(4, 3), torch.zeros(4), None, True)


def test_refusal_messages_print_numbers_sizes_and_dtypes_as_torch_does():
    # The extension builds its messages without std::ostream (csrc/message.h: a crash in its integer insertion on
    # the H100 machine); the whole first line, numbers, sizes and dtype names as torch prints them.
    y = torch.randn(2, 4, 3, 3)
    cases = [
        ((y, torch.zeros(5), None, True), f"bias must have shape (4,), got {list(torch.zeros(5).shape)}"),
        ((y, torch.zeros(4), torch.randn(2, 4, 3, 2), True),
         f"residual must have y's shape {list(y.shape)}, got {[2, 4, 3, 2]}"),
        ((y.int(), torch.zeros(4), None, True),
         "y must be floating point (float16, bfloat16, float32 or float64), got Int"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(RuntimeError) as refused:
            ops.bias_residual_relu(*args)
        assert str(refused.value).splitlines()[0] == f"bias_residual_relu: {message}"


# ---------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, gradcheck
# ---------------------------------------------------------------------------------------------------------
def _op_args(kind, dtype, device, residual, prologue, relu, requires_grad):
    x, w, b, r, config, s, t = _make(kind, dtype, device, residual=residual, prologue=prologue, n=2, hw=(7, 6))
    tensors = [x, w, b, r, s, t]
    if requires_grad:
        for tensor in tensors:
            if tensor is not None:
                tensor.requires_grad_(True)
    c = config
    return (*tensors, list(c.stride), list(c.padding), list(c.dilation), c.groups, relu)


OPCHECK_CASES = [
    ("3x3s1", True, False, True),
    ("3x3s2", False, False, False),
    ("grouped3x3", True, True, True),
    ("stem7x7s2", False, True, True),
]


@pytest.mark.parametrize("kind, residual, prologue, relu", OPCHECK_CASES)
def test_conv_bias_act_opcheck_cpu(kind, residual, prologue, relu):
    args = _op_args(CONV_KINDS[kind], torch.float32, "cpu", residual, prologue, relu, requires_grad=True)
    torch.library.opcheck(ops.conv_bias_act.default, args)


@pytest.mark.parametrize("residual", [True, False])
def test_bias_residual_relu_opcheck_cpu(residual):
    y = torch.randn(2, 5, 3, 4, requires_grad=True)
    r = torch.randn(2, 5, 3, 4, requires_grad=True) if residual else None
    torch.library.opcheck(ops.bias_residual_relu.default, (y, torch.randn(5, requires_grad=True), r, True))


def test_compile_fullgraph_aot_eager_cpu():
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32, prologue=True)

    def block(x, w, b, r, s, t):
        y = cpp_backend.conv_bias_act(x, w, b, None, config, False, s, t)
        return cpp_backend.bias_residual_relu(y, torch.zeros_like(b), r, True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, r, s, t), block(x, w, b, r, s, t))


# Few channels and pixels: gradcheck perturbs every input element.
GRADCHECK_CASES = {
    "3x3s1": ((3, 4, 3, 1, 1, 1, 1), True, False, True),
    "3x3s2": ((3, 4, 3, 2, 1, 1, 1), False, False, False),
    "grouped3x3": ((4, 4, 3, 1, 1, 1, 2), True, True, True),
    "5x5s2": ((3, 2, 5, 2, 2, 1, 1), False, True, True),
    "dilated3x3d2": ((2, 3, 3, 1, 2, 2, 1), True, False, True),
}


@pytest.mark.parametrize("kind, residual, prologue, relu", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_conv_bias_act_gradcheck_float64(kind, residual, prologue, relu):
    x, w, b, r, config, s, t = _make(kind, torch.float64, residual=residual, prologue=prologue, n=1, hw=(5, 4))
    b, s, t = (None if v is None else v.double() for v in (b, s, t))
    inputs = [v.requires_grad_(True) for v in (x, w, b, r, s, t) if v is not None]

    def fn(*flat):
        it = iter(flat)
        x_, w_, b_ = next(it), next(it), next(it)
        r_ = next(it) if r is not None else None
        s_, t_ = (next(it), next(it)) if s is not None else (None, None)
        return cpp_backend.conv_bias_act(x_, w_, b_, r_, config, relu, s_, t_)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bias_residual_relu_gradcheck_float64():
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: cpp_backend.bias_residual_relu(*a, True), (y, b, r))


# ---------------------------------------------------------------------------------------------------------
# Backend entries
# ---------------------------------------------------------------------------------------------------------
def test_backend_entries():
    cpu, cuda = cpp_backend.backend("cpu"), cpp_backend.backend("cuda")
    assert cpu.unavailable() is None
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32)
    assert cpu.unsupported(x, w, r, config, True) is None
    assert "cuda tensors" in cuda.unsupported(x, w, r, config, False)
    if not HAS_CUDA:
        assert cuda.unavailable() is not None
    with pytest.raises(ValueError, match="not 'triton'"):
        cpp_backend.backend("triton")


def test_extension_reports_its_build():
    assert _C.torch_version() == torch.__version__
    assert isinstance(_C.has_cuda(), bool)


def test_stale_or_missing_extension_is_reported(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    with pytest.raises(cpp_backend.ExtensionMismatchError, match="rebuild it with `pip install --no-build-isolation"):
        cpp_backend._load_extension()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "fused_resnet._C", None)  # as if it were never built
    module, reason = cpp_backend._load_extension()
    assert module is None and "not built" in reason


# ---------------------------------------------------------------------------------------------------------
# CUDA: every unique conv shape of ResNet-18/50/101/152, ResNeXt-50 32x4d, ResNeXt-101 64x4d (groups 64) and
# ResNet-50 with dilation (replace_stride_with_dilation=[False, True, True]: dilation 2 and 4), 224x224 input.
# (Cin, H=W, Cout, kernel, stride, padding, dilation, groups); test_resnet_shape_table_matches_torchvision
# regenerates it from torchvision.
# ---------------------------------------------------------------------------------------------------------
RESNET_SHAPES = [
    (3, 224, 64, 7, 2, 3, 1, 1), (64, 56, 64, 3, 1, 1, 1, 1), (64, 56, 128, 3, 2, 1, 1, 1),
    (128, 28, 128, 3, 1, 1, 1, 1), (64, 56, 128, 1, 2, 0, 1, 1), (128, 28, 256, 3, 2, 1, 1, 1),
    (256, 14, 256, 3, 1, 1, 1, 1), (128, 28, 256, 1, 2, 0, 1, 1), (256, 14, 512, 3, 2, 1, 1, 1),
    (512, 7, 512, 3, 1, 1, 1, 1), (256, 14, 512, 1, 2, 0, 1, 1), (64, 56, 64, 1, 1, 0, 1, 1),
    (64, 56, 256, 1, 1, 0, 1, 1), (256, 56, 64, 1, 1, 0, 1, 1), (256, 56, 128, 1, 1, 0, 1, 1),
    (128, 56, 128, 3, 2, 1, 1, 1), (128, 28, 512, 1, 1, 0, 1, 1), (256, 56, 512, 1, 2, 0, 1, 1),
    (512, 28, 128, 1, 1, 0, 1, 1), (512, 28, 256, 1, 1, 0, 1, 1), (256, 28, 256, 3, 2, 1, 1, 1),
    (256, 14, 1024, 1, 1, 0, 1, 1), (512, 28, 1024, 1, 2, 0, 1, 1), (1024, 14, 256, 1, 1, 0, 1, 1),
    (1024, 14, 512, 1, 1, 0, 1, 1), (512, 14, 512, 3, 2, 1, 1, 1), (512, 7, 2048, 1, 1, 0, 1, 1),
    (1024, 14, 2048, 1, 2, 0, 1, 1), (2048, 7, 512, 1, 1, 0, 1, 1), (64, 56, 128, 1, 1, 0, 1, 1),
    (128, 56, 128, 3, 1, 1, 1, 32), (128, 56, 256, 1, 1, 0, 1, 1), (256, 56, 256, 1, 1, 0, 1, 1),
    (256, 56, 256, 3, 2, 1, 1, 32), (256, 28, 512, 1, 1, 0, 1, 1), (256, 28, 256, 3, 1, 1, 1, 32),
    (512, 28, 512, 1, 1, 0, 1, 1), (512, 28, 512, 3, 2, 1, 1, 32), (512, 14, 1024, 1, 1, 0, 1, 1),
    (512, 14, 512, 3, 1, 1, 1, 32), (1024, 14, 1024, 1, 1, 0, 1, 1), (1024, 14, 1024, 3, 2, 1, 1, 32),
    (1024, 7, 2048, 1, 1, 0, 1, 1), (2048, 7, 1024, 1, 1, 0, 1, 1), (1024, 7, 1024, 3, 1, 1, 1, 32),
    (256, 56, 256, 3, 1, 1, 1, 64), (256, 56, 512, 1, 1, 0, 1, 1), (512, 56, 512, 3, 2, 1, 1, 64),
    (512, 28, 512, 3, 1, 1, 1, 64), (512, 28, 1024, 1, 1, 0, 1, 1), (1024, 28, 1024, 3, 2, 1, 1, 64),
    (1024, 14, 1024, 3, 1, 1, 1, 64), (1024, 14, 2048, 1, 1, 0, 1, 1), (2048, 14, 2048, 3, 2, 1, 1, 64),
    (2048, 7, 2048, 1, 1, 0, 1, 1), (2048, 7, 2048, 3, 1, 1, 1, 64), (256, 28, 256, 3, 1, 1, 1, 1),
    (256, 28, 1024, 1, 1, 0, 1, 1), (1024, 28, 256, 1, 1, 0, 1, 1), (256, 28, 256, 3, 1, 2, 2, 1),
    (1024, 28, 512, 1, 1, 0, 1, 1), (512, 28, 512, 3, 1, 2, 2, 1), (512, 28, 2048, 1, 1, 0, 1, 1),
    (1024, 28, 2048, 1, 1, 0, 1, 1), (2048, 28, 512, 1, 1, 0, 1, 1), (512, 28, 512, 3, 1, 4, 4, 1),
]  # fmt: skip
GPU_BATCH = int(os.environ.get("FUSED_RESNET_GPU_TEST_BATCH", "8"))
CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _shape_id(shape):
    cin, hw, cout, k, stride, padding, dilation, groups = shape
    return f"{cin}x{hw}-{cout}-k{k}s{stride}p{padding}d{dilation}g{groups}"


def test_resnet_shape_table_matches_torchvision():
    models = pytest.importorskip("torchvision.models")
    found = []
    builders = [
        (models.resnet18, {}), (models.resnet50, {}), (models.resnet101, {}), (models.resnet152, {}),
        (models.resnext50_32x4d, {}), (models.resnext101_64x4d, {}),
        (models.resnet50, {"replace_stride_with_dilation": [False, True, True]}),
    ]  # fmt: skip
    for build, kwargs in builders:
        with torch.device("meta"):
            model = build(**kwargs)

        def record(conv, inputs, output):
            shape = (inputs[0].shape[1], inputs[0].shape[2], conv.out_channels, conv.kernel_size[0])
            shape += (conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups)
            if shape not in found:
                found.append(shape)

        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(record)
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert sorted(found) == sorted(RESNET_SHAPES)


def _cuda_case(shape, dtype, residual, prologue=False, n=GPU_BATCH, seed=0):
    cin, hw, cout, k, stride, padding, dilation, groups = shape
    return _make(
        (cin, cout, k, stride, padding, dilation, groups), dtype, "cuda", n=n, hw=(hw, hw), residual=residual,
        prologue=prologue, seed=seed,
    )  # fmt: skip


def _check_cuda(args, relu, dtype):
    x, w, b, r, config, s, t = args
    out = _call(x, w, b, r, config, relu, s, t)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        expected = _reference(x, w, b, r, config, relu, s, t, torch.float32)  # cuDNN fp32 on the rounded inputs
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert out.dtype == dtype and out.shape == expected.shape and out.stride() == _canonical_strides(out.shape)
    err = tolerances.relative_error(out, expected)
    if err > tolerances.forward_rtol(dtype, "cuda"):
        cudnn_err = tolerances.relative_error(_reference(x, w, b, r, config, relu, s, t, dtype), expected)
        pytest.fail(
            f"relative error {err:.2e} (cuDNN in {dtype}: {cudnn_err:.2e}), "
            f"max abs {tolerances.max_abs_error(out, expected):.2e}"
        )
    return out, expected


@gpu
@needs_cuda
@pytest.mark.parametrize("residual", [True, False], ids=["res-relu", "plain"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=_shape_id)
def test_conv_bias_act_cuda_resnet_shapes(shape, dtype, residual):
    _check_cuda(_cuda_case(shape, dtype, residual), relu=residual, dtype=dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("kind", CONV_KINDS.values(), ids=CONV_KINDS.keys())
def test_conv_bias_act_cuda_small_and_prologue(kind, dtype):
    """Tiny odd sizes (partial tiles everywhere) and the pre-activation prologue (generic loader)."""
    for residual, relu, prologue in EPILOGUES:
        args = _make(kind, dtype, "cuda", residual=residual, prologue=prologue, n=3, hw=(13, 10))
        _check_cuda(args, relu, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_conv_bias_act_cuda_misaligned_and_nchw(dtype):
    """A 16-byte-misaligned input (generic loader) and an NCHW input give the same answers."""
    shape = (64, 28, 64, 3, 1, 1, 1, 1)
    x, w, b, r, config, s, t = _cuda_case(shape, dtype, residual=True, n=2)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    x_mis = buf[1:].view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2).copy_(x)
    assert x_mis.data_ptr() % 16 != 0
    _check_cuda((x_mis, w, b, r, config, s, t), True, dtype)
    _check_cuda((x.contiguous(), w.contiguous(), b, r.contiguous(), config, s, t), True, dtype)


@gpu
@needs_cuda
def test_conv_bias_act_cuda_64bit_offsets():
    """N*H*W*C > 2^31 elements: the last rows of the image must still be right (64-bit offsets)."""
    n, c, hw, cout = 1, 64, 5800, 64  # 2.15e9 input elements in bf16: 4.3 GB, the output as much
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~10 GB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(n, hw, hw, c, dtype=torch.bfloat16, device="cuda").normal_(generator=g).permute(0, 3, 1, 2)
    w = (
        (torch.randn(cout, c, 1, 1, device="cuda") * 0.1)
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last)
    )
    b = torch.randn(cout, device="cuda")
    out = _call(x, w, b, None, ConvConfig(), True, None, None)
    tail = x[:, :, -3:, :]
    expected = reference.conv_bias_act(tail.float(), w.float(), b, None, ConvConfig(), True)
    assert tolerances.relative_error(out[:, :, -3:, :], expected) <= tolerances.forward_rtol(torch.bfloat16, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_bias_residual_relu_cuda_matches_torch(dtype):
    y = torch.randn(2, 37, 5, 3, device="cuda").to(dtype)
    bias = torch.randn(37, device="cuda")
    r = torch.randn(2, 37, 5, 3, device="cuda").to(dtype)
    out = cpp_backend.bias_residual_relu(y, bias, r, True)
    expected = torch.relu(y.float() + bias.view(1, -1, 1, 1) + r.float()).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("kind, residual, prologue, relu", OPCHECK_CASES)
def test_conv_bias_act_opcheck_cuda(kind, residual, prologue, relu, dtype):
    args = _op_args(CONV_KINDS[kind], dtype, "cuda", residual, prologue, relu, requires_grad=True)
    torch.library.opcheck(ops.conv_bias_act.default, args)


@gpu
@needs_cuda
def test_bias_residual_relu_opcheck_cuda():
    y = torch.randn(2, 5, 3, 4, device="cuda", requires_grad=True)
    r = torch.randn(2, 5, 3, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.bias_residual_relu.default, (y, torch.randn(5, device="cuda"), r, True))


@gpu
@needs_cuda
def test_cuda_backend_refuses_float64_and_strict_fp32():
    cuda = cpp_backend.backend("cuda")
    assert cuda.unavailable() is None
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float64, "cuda")
    assert "float64" in cuda.unsupported(x, w, r, config, False)
    x, w, b, r, config, s, t = _make(CONV_KINDS["3x3s1"], torch.float32, "cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        assert "TF32" in cuda.unsupported(x, w, r, config, False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    with pytest.raises(RuntimeError, match="float64"):
        x64, w64, b64, *_ = _make(CONV_KINDS["3x3s1"], torch.float64, "cuda", residual=False)
        ops.conv_bias_act(x64, w64, b64, None, None, None, [1, 1], [1, 1], [1, 1], 1, True)
