"""The Triton conv_bias_act op against the reference: under the Triton interpreter on CPU, compiled on a GPU."""

import dataclasses
import functools
import json

import pytest
import torch
import triton
import triton.language as tl
from sm90_compile import assert_compiles

from fused_resnet import backends
from fused_resnet.ops import reference, triton_tune
from fused_resnet.ops import triton_conv_bias_act as tcba
from fused_resnet.ops.conv_bias_act_autograd import fake_conv_bias_act
from fused_resnet.ops.conv_config import ConvConfig
from fused_resnet.ops.triton_backend import backend as triton_backend
from fused_resnet.tolerances import FORWARD_RTOL, max_abs_error, relative_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda" and not tcba.INTERPRET

if DEVICE.type == "cpu" and not tcba.INTERPRET:  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

op = torch.ops.fused_resnet.triton_conv_bias_act
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton kernels)")

# Relative-norm error of one fused conv against fp64 computed from the same rounded inputs. The kernel sums in
# fp32 and rounds once at the end; the prologue rounds its output to the input dtype once (the MMA operands
# need it). With unit roundoff u that is <= 2u; the F.conv2d reference in the same dtype rounds twice more
# (after the conv, after the residual add): 4u bounds both comparisons.
#   fp16: u = 2^-11 -> 2e-3.   bf16: u = 2^-8 -> 1.6e-2.
#   fp32: exact fp32 products (the interpreter; GPU with TF32 off): tolerances.FORWARD_RTOL, 1e-5;
#         GPU with TF32 (10-bit mantissa, u = 2^-11) as cuDNN does by default: 4u = 2e-3.
#   fp64: the interpreter only (for gradcheck): FORWARD_RTOL, 1e-10.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: FORWARD_RTOL[torch.float32], torch.float64: 1e-10}
RTOL_TF32 = 2e-3


def rtol(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and ON_GPU and tcba.conv_allows_tf32():
        return RTOL_TF32
    return RTOL[dtype]


def make_operands(x_shape, w_shape, config, dtype, residual=True, prologue=True, seed=0):
    """Random operands on DEVICE, activations channels_last, scaled so outputs stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = x_shape
    c_out, c_in_g, kh, kw = w_shape
    oh, ow = config.output_hw(h, w, kh, kw)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=gen) * scale).to(DEVICE)

    return {
        "x": randn(*x_shape).to(dtype).contiguous(memory_format=torch.channels_last),
        "weight": randn(*w_shape, scale=(c_in_g * kh * kw) ** -0.5)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last),
        "bias": randn(c_out),
        "residual": randn(n, c_out, oh, ow).to(dtype).contiguous(memory_format=torch.channels_last)
        if residual
        else None,
        "in_scale": (torch.rand(c, generator=gen) + 0.5).to(DEVICE) if prologue else None,
        "in_shift": randn(c, scale=0.5) if prologue else None,
    }


def call_op(ops, config, relu):
    return op(
        ops["x"],
        ops["weight"],
        ops["bias"],
        ops["residual"],
        ops["in_scale"],
        ops["in_shift"],
        list(config.stride),
        list(config.padding),
        list(config.dilation),
        config.groups,
        relu,
    )


def expected(ops, config, relu, dtype):
    """The reference in `dtype` (F.conv2d) and in fp64 from the same rounded operands."""
    args = (ops["x"], ops["weight"], ops["bias"], ops["residual"])
    pre = (ops["in_scale"], ops["in_shift"])
    same = reference.conv_bias_act(*args, config, relu, *pre)
    fp64 = [t.double() if t is not None else None for t in (*args, *pre)]
    if DEVICE.type == "cuda":  # cuDNN's fp64 convs are slow at the GPU test sizes; fp32 without TF32 suffices
        fp64 = [t.float() if t is not None else None for t in fp64]
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            wide = reference.conv_bias_act(*fp64[:4], config, relu, *fp64[4:])
    else:
        wide = reference.conv_bias_act(*fp64[:4], config, relu, *fp64[4:])
    return same, wide


def assert_close(out, ops, config, relu, dtype):
    same, wide = expected(ops, config, relu, dtype)
    assert out.dtype == dtype
    assert out.shape == same.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = rtol(dtype)
    for name, ref in (("fp64", wide), (str(dtype), same)):
        err = relative_error(out, ref)
        assert err <= tol, (
            f"vs {name} reference: relative error {err:.3g} > {tol:.3g}, max abs {max_abs_error(out, ref):.3g}"
        )


# name: (input N, C, H, W), (Cout, Cin/groups, KH, KW), stride, padding, dilation, groups
CASES = {
    "stem7x7s2_cin3": ((1, 3, 15, 13), (16, 3, 7, 7), 2, 3, 1, 1),
    "cifar_stem3x3_cin3": ((2, 3, 10, 10), (16, 3, 3, 3), 1, 1, 1, 1),
    "3x3s1": ((2, 16, 9, 9), (24, 16, 3, 3), 1, 1, 1, 1),
    "3x3s2_odd": ((1, 24, 9, 7), (40, 24, 3, 3), 2, 1, 1, 1),
    "3x3_two_channel_blocks_no_pad": ((1, 48, 6, 6), (40, 48, 3, 3), 1, 0, 1, 1),
    "1x1s1": ((2, 40, 7, 7), (64, 40, 1, 1), 1, 0, 1, 1),
    "1x1s2_projection": ((2, 32, 9, 9), (48, 32, 1, 1), 2, 0, 1, 1),
    "grouped3x3_4_per_group": ((1, 32, 5, 5), (32, 4, 3, 3), 1, 1, 1, 8),
    "grouped3x3s2_groups32": ((1, 64, 4, 4), (64, 2, 3, 3), 2, 1, 1, 32),
    "dilation2": ((1, 16, 11, 11), (16, 16, 3, 3), 1, 2, 2, 1),
    "dilation4": ((1, 8, 13, 13), (16, 8, 3, 3), 1, 4, 4, 1),
    "1x1_spatial": ((2, 64, 1, 1), (32, 64, 1, 1), 1, 0, 1, 1),
    "3x3s2_2x2_input": ((1, 32, 2, 2), (16, 32, 3, 3), 2, 1, 1, 1),
}


def case_config(case):
    _, _, stride, padding, dilation, groups = case
    return ConvConfig((stride, stride), (padding, padding), (dilation, dilation), groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    case = CASES[name]
    config = case_config(case)
    ops = make_operands(case[0], case[1], config, dtype)
    assert_close(call_op(ops, config, relu=True), ops, config, True, dtype)


@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_epilogue_and_prologue_combinations(relu, residual, prologue):
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 8, 6, 5), (16, 8, 3, 3), config, torch.float32, residual, prologue)
    assert_close(call_op(ops, config, relu), ops, config, relu, torch.float32)


def test_prologue_keeps_padding_zero():
    # A large shift would make relu(0·scale + shift) large: padded pixels must still contribute nothing.
    config = ConvConfig((1, 1), (2, 2), (1, 1), 1)
    ops = make_operands((1, 4, 5, 5), (8, 4, 3, 3), config, torch.float32, residual=False)
    ops["in_shift"] = torch.full((4,), 10.0, device=DEVICE)
    assert_close(call_op(ops, config, relu=False), ops, config, False, torch.float32)


@pytest.mark.parametrize(
    "kernel_config",
    [
        tcba.KernelConfig(16, 16, 16, group_m=2, unroll_taps=True),
        tcba.KernelConfig(16, 16, 16, group_m=3, unroll_taps=False),
        tcba.KernelConfig(32, 16, 32, group_m=1, unroll_taps=False),
        tcba.KernelConfig(128, 64, 64, group_m=8, unroll_taps=True),
    ],
    ids=str,
)
def test_tile_and_loop_variants(kernel_config):
    # Several M and N tiles, partial GROUP_M groups, several channel blocks per tap, both loop structures.
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((2, 40, 7, 7), (24, 40, 3, 3), config, torch.float32)
    out = tcba.conv_bias_act(*ops.values(), config, True, kernel_config)
    assert_close(out, ops, config, True, torch.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_both_reduction_orders(name):
    # The heuristic packs the taps into the reduction only below 16 channels per group; each case also runs the
    # other order, so both loops see every shape (the tuner may pick either).
    case = CASES[name]
    config = case_config(case)
    c_out, c_in_g, kh, kw = case[1]
    chosen = tcba.default_config(c_in_g, c_out // config.groups, kh, kw, torch.float32, interpret=True)
    if kh * kw == 1:
        pytest.skip("one tap: both orders are the same loop")
    other = dataclasses.replace(chosen, pack_taps=not chosen.pack_taps, unroll_taps=False)
    ops = make_operands(case[0], case[1], config, torch.float32)
    out = tcba.conv_bias_act(*ops.values(), config, True, other)
    assert_close(out, ops, config, True, torch.float32)


def test_memory_formats_and_strided_operands():
    config = ConvConfig((2, 2), (1, 1), (1, 1), 1)
    ops = make_operands((2, 8, 7, 9), (16, 8, 3, 3), config, torch.float32)
    contiguous = {k: v.contiguous() if v is not None else None for k, v in ops.items()}
    contiguous["bias"] = torch.randn(32, device=DEVICE)[::2]  # a strided 1-D view
    out = call_op(contiguous, config, relu=True)
    assert_close(out, contiguous, config, True, torch.float32)
    fake = fake_conv_bias_act(*[contiguous[k] for k in ops], [2, 2], [1, 1], [1, 1], 1, True)
    assert out.stride() == fake.stride()


def test_empty_batch():
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((0, 4, 5, 5), (8, 4, 3, 3), config, torch.float32)
    out = call_op(ops, config, relu=True)
    assert out.shape == (0, 8, 5, 5)


@triton.jit
def _offsets_kernel(out_ptr, n_ptr, h_ptr, w_ptr, stride_n, stride_h, stride_w, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offsets = tcba._pixel_offset(
        tl.load(n_ptr + i), tl.load(h_ptr + i), tl.load(w_ptr + i), stride_n, stride_h, stride_w
    )
    tl.store(out_ptr + i, offsets)


def test_pixel_offsets_are_int64():
    # A 1024×64×224×224 batch: its last pixels lie past 2**31 elements, with every index and stride an int32.
    strides = (64 * 224 * 224, 224 * 64, 64)
    n = torch.tensor([0, 700, 1023, 1023], dtype=torch.int32, device=DEVICE)
    h = torch.tensor([0, 5, 223, 223], dtype=torch.int32, device=DEVICE)
    w = torch.tensor([-1, 7, 200, 223], dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, n, h, w, *strides, BLOCK=4)
    want = [int(a) * strides[0] + int(b) * strides[1] + int(c) * strides[2] for a, b, c in zip(n, h, w, strict=True)]
    assert out.tolist() == want
    assert max(want) > 2**31


@pytest.mark.parametrize("prologue", [False, True])
def test_gradcheck_float64(prologue):
    if ON_GPU:
        pytest.skip("float64 runs only under the Triton interpreter")
    config = ConvConfig((2, 2), (1, 1), (1, 1), 2)
    ops = make_operands((1, 4, 5, 5), (6, 2, 3, 3), config, torch.float64, prologue=prologue)
    ops = {k: v.double().requires_grad_() if v is not None else None for k, v in ops.items()}
    assert torch.autograd.gradcheck(
        lambda *t: call_op(dict(zip(ops, t, strict=True)), config, True), tuple(ops.values()), fast_mode=True
    )


def test_opcheck():
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 4, 4, 4), (8, 4, 3, 3), config, torch.float32)
    args = (*ops.values(), [1, 1], [1, 1], [1, 1], 1, True)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 8, 5, 5), (8, 8, 3, 3), config, torch.float32)

    def block(x, weight, bias, residual, in_scale, in_shift):
        y = op(x, weight, bias, residual, in_scale, in_shift, [1, 1], [1, 1], [1, 1], 1, True)
        return op(y, weight, bias, None, None, None, [1, 1], [1, 1], [1, 1], 1, False) * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*ops.values()), block(*ops.values()))


def test_backend_entry_point():
    chosen = backends.select("triton", *make_backend_args(), prologue=True)
    assert chosen.name == "triton"
    assert chosen.unavailable() is None
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 8, 5, 5), (8, 8, 3, 3), config, torch.float32)
    out = chosen.conv_bias_act(
        ops["x"], ops["weight"], ops["bias"], ops["residual"], config, True, ops["in_scale"], ops["in_shift"]
    )
    assert_close(out, ops, config, True, torch.float32)


def make_backend_args():
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 8, 5, 5), (8, 8, 3, 3), config, torch.float32)
    return ops["x"], ops["weight"], ops["residual"], config


def test_backend_unsupported_reasons(monkeypatch):
    unsupported = triton_backend().unsupported
    x, weight, residual, config = make_backend_args()
    assert unsupported(x, weight, residual, config, True) is None
    assert "dtype" in unsupported(x.int(), weight, residual, config, False)
    assert "meta" in unsupported(x.to("meta"), weight, residual, config, False)
    monkeypatch.setattr(tcba, "INTERPRET", False)
    if DEVICE.type == "cpu":
        assert "interpreter" in unsupported(x, weight, residual, config, False)
        assert "interpreter" in triton_backend().unavailable()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call_op(make_operands((1, 4, 4, 4), (8, 4, 3, 3), config, torch.float32), config, True)
    else:
        assert "dtype" in unsupported(x.double(), weight.double(), residual.double(), config, False)


def bad_call(**changes):
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 4, 5, 5), (8, 4, 3, 3), config, torch.float32)
    stride = changes.pop("stride", [1, 1])
    ops.update(changes)
    return op(*ops.values(), stride, [1, 1], [1, 1], 1, True)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"in_scale": torch.ones(5)}, ValueError, r"in_scale must have shape \(4,\)"),
        ({"in_shift": None}, ValueError, "in_scale and in_shift"),
        ({"in_shift": torch.ones(4, dtype=torch.float16)}, TypeError, "in_shift must be float32"),
        ({"bias": torch.ones(3)}, ValueError, r"bias must have shape \(8,\)"),
        ({"stride": [0, 1]}, ValueError, "stride must be two integers >= 1"),
        ({"residual": torch.ones(1, 8, 4, 4)}, ValueError, "residual must have the output shape"),
        ({"weight": torch.ones(8, 4, 0, 3)}, ValueError, "non-empty kernel"),  # it returned relu(bias) (an audit)
    ],
    ids=["scale_shape", "shift_missing", "shift_dtype", "bias_shape", "stride", "residual_shape", "empty_kernel"],
)
def test_bad_inputs(changes, error, match):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(error, match=match):
        bad_call(**changes)


def test_size_limits():
    config = ConvConfig((1, 1), (0, 0), (1, 1), 1)
    assert tcba.size_limit_reason((2, 8, 5, 5), (8, 8, 1, 1), config) is None
    assert "32-bit row index" in tcba.size_limit_reason((2**16, 8, 256, 256), (8, 8, 1, 1), config)
    grouped = ConvConfig((1, 1), (0, 0), (1, 1), 2**16)
    assert "grid limit" in tcba.size_limit_reason((1, 2**16, 1, 1), (2**16, 1, 1, 1), grouped)


def test_prologue_device_mismatch():
    x = torch.zeros(1, 4, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="in_scale is on meta"):
        tcba._check_prologue(x, torch.ones(4, device="meta"), torch.ones(4, device=DEVICE))


@gpu
@needs_gpu
def test_float64_refused_on_gpu():
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    ops = make_operands((1, 4, 5, 5), (8, 4, 3, 3), config, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        call_op(ops, config, relu=True)


# ------------------------------------------------------------------ launch configuration: candidates, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 64, 7, 7), (64, 64, 3, 3), (4, 4, 3, 3), (1024, 256, 1, 1)])
def test_candidate_configs(shape, dtype):
    c_in_g, c_out_g, kh, kw = shape
    configs = tcba.candidate_configs(c_in_g, c_out_g, kh, kw, dtype)
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        for size in (config.block_m, config.block_n, config.block_k):
            assert size >= 16 and size & (size - 1) == 0
        assert config.block_n <= max(16, triton.next_power_of_2(c_out_g))
        reduction = c_in_g * kh * kw if config.pack_taps else c_in_g
        assert config.block_k <= max(16, triton.next_power_of_2(reduction))
        assert not config.unroll_taps or (kh * kw in range(2, 10) and not config.pack_taps)
        assert not config.pack_taps or (c_in_g < 16 and kh * kw > 1)
    default = tcba.default_config(c_in_g, c_out_g, kh, kw, dtype)
    assert default in configs
    assert not default.pack_taps  # on the GPU packing is left to the tuner (measured slower for the stem)
    packs = {config.pack_taps for config in configs}
    assert packs == ({False, True} if c_in_g < 16 and kh * kw > 1 else {False})  # the tuner tries both orders


def test_committed_table_holds_candidates_of_resnet50_shapes():
    # The tuner only writes a candidate it checked on the GPU: a table entry outside the candidate list (a hand edit,
    # or a candidate list changed after tuning) would launch a config that no check ever ran.
    table = tcba.tuned_table()
    assert table, "no committed table"
    shapes = {
        tcba.shape_key((s.batch, s.c_in, s.h, s.w), (s.c_out, s.c_in // s.groups, s.kh, s.kw), s.config,
                       torch.bfloat16, "cuda"): s
        for s in triton_tune.resnet_conv_shapes("resnet50", 256)
    }  # fmt: skip
    for gpu, entries in table.items():
        assert set(entries) == set(shapes), gpu
        for key, fields in entries.items():
            s = shapes[key]
            allowed = tcba.candidate_configs(s.c_in // s.groups, s.c_out // s.groups, s.kh, s.kw, torch.bfloat16,
                                             tma=True)  # fmt: skip
            assert tcba.KernelConfig(**fields) in allowed, (gpu, key, fields)


def test_tuned_table_lookup(monkeypatch):
    config = ConvConfig((1, 1), (1, 1), (1, 1), 1)
    x_shape, w_shape = (24, 64, 56, 56), (64, 64, 3, 3)
    key = tcba.shape_key(x_shape, w_shape, config, torch.bfloat16, "cuda")
    assert key == tcba.shape_key((32, 64, 56, 56), w_shape, config, torch.bfloat16, "cuda")  # batch bucket
    tuned = tcba.KernelConfig(128, 64, 32, 4, False, 8, 5)
    monkeypatch.setattr(tcba, "INTERPRET", False)
    monkeypatch.setattr(tcba, "_gpu_name", lambda index: "Some GPU")
    monkeypatch.setattr(tcba, "tuned_table", lambda: {"Some GPU": {key: vars(tuned)}})
    # A memo of its own, so that nothing looked up under these patches outlives the test.
    monkeypatch.setattr(tcba, "_kernel_config_for", functools.lru_cache(tcba._kernel_config_for.__wrapped__))
    cuda = torch.device("cuda", 0)
    assert tcba.kernel_config_for(x_shape, w_shape, config, torch.bfloat16, cuda) == tuned
    heuristic = tcba.kernel_config_for(x_shape, w_shape, config, torch.float16, cuda)
    assert heuristic == tcba.default_config(64, 64, 3, 3, torch.float16)


def test_committed_table_is_valid():
    table = json.loads(tcba.TUNED_CONFIGS_PATH.read_text())
    for entries in table.values():
        for entry in entries.values():
            tcba.KernelConfig(**entry)


def test_resnet_shapes_match_torchvision():
    torchvision = pytest.importorskip("torchvision")
    for model in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"):
        with torch.device("meta"):
            net = getattr(torchvision.models, model)()
        seen = []

        def record(module, inputs, seen=seen):
            n, c, h, w = inputs[0].shape
            c_out, _, kh, kw = module.weight.shape
            shape = triton_tune.ConvShape(
                n, c, h, w, c_out, kh, kw, module.stride[0], module.padding[0], module.dilation[0], module.groups
            )
            seen.append(shape)

        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(record)
        net(torch.empty(2, 3, 224, 224, device="meta"))
        assert triton_tune.resnet_conv_shapes(model, batch=2) == list(dict.fromkeys(seen))


@triton.jit
def _round_to_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tcba._round_to_tf32(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_tf32_rounding_is_round_to_nearest():
    _check_tf32_rounding()


@gpu
@needs_gpu
def test_tf32_rounding_on_gpu():
    _check_tf32_rounding()


def _check_tf32_rounding():
    # Reference: the 11 significant bits of each value's frexp mantissa, rounded half away from zero.
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,)), torch.tensor([1 + 2**-11, -3.0])])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])]).to(DEVICE)
    y = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    mantissa, exponent = torch.frexp(x.double().cpu())
    scaled = mantissa * 2**11
    expected = torch.ldexp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) / 2**11, exponent.double())
    expected = torch.where(x.cpu().isinf(), x.cpu().double(), expected).float()
    assert torch.equal(y.cpu(), expected)
    assert y[-6].item() == 1 + 2**-10  # a tie rounds away from zero
    assert (y.cpu().view(torch.int32) & 0x1FFF).eq(0).all()  # nothing below the 10th mantissa bit


def test_tuner_check_config():
    shape = triton_tune.ConvShape(1, 8, 5, 5, 16, 3, 3, 2, 1)
    inputs = triton_tune.make_inputs(shape, torch.float32, DEVICE)
    config = tcba.candidate_configs(8, 16, 3, 3, torch.float32)[0]
    assert triton_tune.check_config(shape, inputs, config) <= rtol(torch.float32)
    if not ON_GPU:
        assert triton_tune.main(["--dtypes", "fp32"]) == 2  # refuses to tune without a GPU


def test_tuner_checks_side_by_side_as_one_by_one():
    shape = triton_tune.ConvShape(1, 8, 5, 5, 16, 3, 3, 2, 1)
    tag = "tf32" if ON_GPU else "fp32"
    jobs = [(shape, tag, config) for config in triton_tune.candidates_of(shape, torch.float32)[:2]]
    with triton_tune.checking_pool(2) as pool:
        side_by_side = triton_tune.check_all(jobs, pool)
    assert list(side_by_side) == jobs
    with triton_tune.checking_pool(1) as none:
        assert none is None
        assert side_by_side == triton_tune.check_all(jobs, none)
    assert all(error <= rtol(torch.float32) for error in side_by_side.values())


def test_a_candidate_that_cannot_launch_is_reported_not_fatal(monkeypatch):
    shape = triton_tune.ConvShape(1, 8, 5, 5, 16, 3, 3, 2, 1)
    broken, working = triton_tune.candidates_of(shape, torch.float32)[:2]
    monkeypatch.setattr(triton_tune, "candidates_of", lambda shape, dtype: [broken, working])
    real = triton_tune.check_config

    def check(shape, inputs, config):
        if config == broken:
            raise RuntimeError("cuTensorMapEncodeTiled failed\nsecond line")
        return real(shape, inputs, config)

    monkeypatch.setattr(triton_tune, "check_config", check)
    tag = "tf32" if ON_GPU else "fp32"
    assert triton_tune.check_job((shape, tag, broken)) == "failed (RuntimeError: cuTensorMapEncodeTiled failed)"
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: (fn(), 1.0)[1])
    best, lines = triton_tune.tune_shape(shape, torch.float32, DEVICE)
    assert best == working
    assert f"  {broken}: failed (RuntimeError: cuTensorMapEncodeTiled failed)" in lines


def test_tuner_main_checks_times_and_writes_every_shape(monkeypatch, tmp_path):
    # The GPU-only parts stand in: the device queries, and the timing (which returns the first config that passed
    # its check). The checks themselves run for real, in two worker processes (the interpreter on a CPU).
    if not ON_GPU:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
        monkeypatch.setattr(tcba, "INTERPRET", False)
    monkeypatch.setattr(
        triton_tune,
        "candidates_of",
        lambda shape, dtype: tcba.candidate_configs(
            shape.c_in // shape.groups, shape.c_out // shape.groups, shape.kh, shape.kw, dtype
        )[:1],
    )

    def first_passing(shape, dtype, device, checks):
        passing = [c for c, error in checks.items() if not isinstance(error, str) and error <= 1e-2]
        return (passing[0] if passing else None), [f"  {c}: {e}" for c, e in checks.items()]

    monkeypatch.setattr(triton_tune, "tune_shape", first_passing)
    out = tmp_path / "table.json"
    out.write_text("{}")
    args = ["--models", "resnet18", "--batch", "1", "--image-size", "16", "--dtypes", "fp32", "--out", str(out)]
    assert triton_tune.main([*args, "--compile-workers", "2"]) == 0
    (entries,) = json.loads(out.read_text()).values()
    shapes = triton_tune.resnet_conv_shapes("resnet18", 1, 16)
    assert len(shapes) > triton_tune._SHAPES_PER_ROUND  # more than one round of checks
    assert len(entries) == len(shapes)


_COMPILE_SCRIPT = """
import torch

from fused_resnet.ops import triton_conv_bias_act as tcba
from fused_resnet.ops.conv_config import ConvConfig

assert not tcba.INTERPRET
for dtype, (c, k, kh, stride, pad), residual, prologue, config in [
    (torch.bfloat16, (64, 64, 3, 1, 1), True, True, tcba.KernelConfig(64, 64, 32, 8, True, 4, 3)),
    (torch.float32, (3, 64, 7, 2, 3), False, False, tcba.KernelConfig(128, 64, 16, 8, False, 4, 4)),
    (torch.float16, (64, 128, 1, 2, 0), True, False, tcba.KernelConfig(128, 128, 32, 8, False, 8, 3)),
    (torch.bfloat16, (3, 64, 7, 2, 3), False, True, tcba.KernelConfig(128, 64, 64, 8, False, 4, 4, True)),
]:
    conv = ConvConfig((stride, stride), (pad, pad), (1, 1), 1)
    x = torch.zeros(2, c, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(k, c, kh, kh, dtype=dtype).contiguous(memory_format=torch.channels_last)
    oh, ow = conv.output_hw(9, 9, kh, kh)
    r = torch.zeros(2, k, oh, ow, dtype=dtype) if residual else None
    s = t = torch.zeros(c) if prologue else None
    compiles(lambda: tcba.conv_bias_act(x, w, torch.zeros(k), r, s, t, conv, True, config), f"{dtype} {config}")
"""


def test_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    assert_compiles(_COMPILE_SCRIPT, expected=4)


# ------------------------------------------------------------------ GPU: every ResNet layer, every config

GPU_BATCH = 8
_GPU_MODELS = ("resnet18", "resnet50", "resnet101", "resnet152", "resnext50_32x4d")
GPU_SHAPES = list(dict.fromkeys(s for m in _GPU_MODELS for s in triton_tune.resnet_conv_shapes(m, GPU_BATCH)))


def shape_id(shape):
    return f"{shape.c_in}x{shape.h}x{shape.w}-o{shape.c_out}k{shape.kh}s{shape.stride}g{shape.groups}"


# bf16 and fp32 (TF32) are the two MMA paths; fp16 is bf16's template with another type, checked on the small
# shapes above. Each (shape, dtype) compiles its own kernel: three dtypes here were 56 kernels, 92 s to
# compile for sm_90 on 2 CPU cores.
@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_resnet_layer_vs_cudnn(shape, dtype):
    ops = make_operands(
        (shape.batch, shape.c_in, shape.h, shape.w),
        (shape.c_out, shape.c_in // shape.groups, shape.kh, shape.kw),
        shape.config,
        dtype,
    )
    assert_close(call_op(ops, shape.config, relu=True), ops, shape.config, True, dtype)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_autotune_config_is_correct(dtype):
    # PyTorch issue #173068: Triton convs have miscompiled silently with num_warps=8, so every candidate is
    # checked, on a layer wide enough that no candidate is clamped (ResNet-50's 14×14 3×3).
    shape = triton_tune.ConvShape(GPU_BATCH, 256, 14, 14, 256, 3, 3, 1, 1)
    configs = tcba.candidate_configs(256, 256, 3, 3, dtype)
    assert dtype != torch.bfloat16 or len(configs) == len(tcba.CANDIDATES)
    inputs = triton_tune.make_inputs(shape, dtype, DEVICE)
    errors = {config: triton_tune.check_config(shape, inputs, config) for config in configs}
    wrong = {str(c): e for c, e in errors.items() if not e <= rtol(dtype)}
    assert not wrong, f"configs outside {rtol(dtype)}: {wrong}"
