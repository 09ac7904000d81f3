"""The CUDA op's Hopper engine (CUTLASS sm90 implicit-GEMM conv, csrc/cuda/conv_sm90_cutlass.cuh; with the
'cutlass_next' engine also narrow 128x64 conv tiles for at most 64 output channels, 1x1 stride-1 convs on a
persistent GEMM, csrc/cuda/conv_sm90_gemm.cuh, and inputs of under 8 channels as that GEMM over im2col rows; with
'cutlass_trial' those kernels with a persistent conv for over 64 output channels and 64x64 epilogue subtiles on
residual GEMMs) and the engine choice.

Without a GPU: the engine is compiled wherever CI builds the extension, and the choice (set_cuda_engine, the
FUSED_RESNET_CUDA_ENGINE variable) behaves. On a compute capability 9.0 GPU (gpu-marked, run by the GPU check):
every ResNet-family conv shape the engine takes, against cuDNN in fp32 on the same rounded inputs with
test_cpp_ops' tolerances, each call checked to have run on the kernel the engine should pick (its launch counters),
and the calls it must decline (grouped, the 3-channel stem except on the next kernels, the prologue, misaligned or
fp32 tensors) checked to run on the hand-written kernel, still right.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cuda_on_host import THREAD_ORDERS, im2col_rows, thread_order
from cuda_on_host import unavailable as host_cuda_unavailable
from test_cpp_ops import CONV_KINDS, GPU_BATCH, HAS_CUDA, RESNET_SHAPES, _check_cuda, _cuda_case, _make, _shape_id

from fused_resnet import tolerances
from fused_resnet.bench.contenders import engine_note
from fused_resnet.check import check_model
from fused_resnet.ops import cpp_backend, engine_smoke

_C = cpp_backend._C
REQUIRE_EXT = os.environ.get("FUSED_RESNET_REQUIRE_EXT", "0") not in ("", "0")
ON_SM90 = HAS_CUDA and _C.has_sm90_engine() and torch.cuda.get_device_capability() == (9, 0)
gpu = pytest.mark.gpu
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="needs a compute capability 9.0 GPU and _C built with CUTLASS")
ENGINE_DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(params=cpp_backend.HOPPER_ENGINES)
def cutlass_engine(request):
    if ON_SM90:
        # An engine no GPU had run when it was added first runs one call on each of its kernels in a child process
        # with a time limit: a kernel that hangs would otherwise stall this worker for the rest of the stage.
        why = engine_smoke.failure(request.param)
        if why:
            pytest.fail(why)
    with cpp_backend.using_cuda_engine(request.param):
        yield request.param


def _takes(shape) -> bool:
    """Whether the engine in use takes this RESNET_SHAPES entry (without a prologue)."""
    cin, _, cout, _, _, _, _, groups = shape
    im2col = cin < 8 and _on_next_kernels()
    return groups == 1 and (cin % 8 == 0 or im2col) and cout % 8 == 0


# ------------------------------------------------------------------------------------------------- no GPU needed
def test_engine_is_built_where_ci_builds_the_extension():
    # CI builds for the default arch list (with sm_90a) with the nvidia-cutlass headers installed (Makefile).
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a").replace(" ", ";").split(";")
    if not (REQUIRE_EXT and _C.has_cuda() and "9.0a" in arch_list):
        pytest.skip("only where the extension must have been built with CUDA for sm_90a")
    assert _C.has_sm90_engine()


def test_default_engine_is_the_hopper_one_where_built():
    if os.environ.get("FUSED_RESNET_CUDA_ENGINE"):
        pytest.skip("FUSED_RESNET_CUDA_ENGINE chose the engine")
    # A fresh process: other tests change the engine of this one.
    result = subprocess.run(
        [sys.executable, "-c", "from fused_resnet.ops import cpp_backend as c; print(c.cuda_engine())"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == ("cutlass_next" if _C.has_sm90_engine() else "mma")


def test_auto_takes_the_cuda_backend_first_where_the_hopper_engine_runs(monkeypatch):
    from types import SimpleNamespace

    from fused_resnet import backends

    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)  # no GPU needed to choose
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(cpp_backend, "_hopper_engine_enabled", lambda index: True)
    assert backends.auto_order(x)[:2] == ("cuda", "triton")
    assert backends.auto_order(SimpleNamespace(device=x.device, dtype=torch.float32))[0] == "triton"
    monkeypatch.setattr(cpp_backend, "_hopper_engine_enabled", lambda index: False)
    assert backends.auto_order(x) == backends.AUTO_ORDER["cuda"]
    assert backends.auto_order(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16))[0] == "cpu"
    monkeypatch.undo()
    if not _C.has_sm90_engine():
        return
    # The real check: the engine chosen, and a compute capability 9.0 device.
    monkeypatch.setattr(cpp_backend, "cuda_capability", lambda device: (9, 0))
    with cpp_backend.using_cuda_engine("cutlass"):
        assert cpp_backend._hopper_engine_enabled(0)
    with cpp_backend.using_cuda_engine("mma"):
        assert not cpp_backend._hopper_engine_enabled(0)
    monkeypatch.setattr(cpp_backend, "cuda_capability", lambda device: (8, 0))
    with cpp_backend.using_cuda_engine("cutlass"):
        assert not cpp_backend._hopper_engine_enabled(0)


def test_engine_choice_round_trip():
    if not _C.has_sm90_engine():
        pytest.skip("_C was built without the sm90 engine")
    start = cpp_backend.cuda_engine()
    try:
        assert cpp_backend.set_cuda_engine("cutlass") == start
        assert cpp_backend.cuda_engine() == "cutlass" and _C.sm90_engine_enabled()
        with pytest.raises(KeyError), cpp_backend.using_cuda_engine("mma"):
            assert cpp_backend.cuda_engine() == "mma" and not _C.sm90_engine_enabled()
            raise KeyError("the body fails: the engine must still be restored")
        assert cpp_backend.cuda_engine() == "cutlass"
        assert cpp_backend.set_cuda_engine("cutlass_next") == "cutlass"
        assert cpp_backend.cuda_engine() == "cutlass_next" and _C.sm90_engine_enabled() and _C.sm90_next_enabled()
        assert cpp_backend.set_cuda_engine("cutlass_trial") == "cutlass_next"
        assert _C.sm90_engine_enabled() and _C.sm90_next_enabled() and _C.sm90_trial_features() == 7
        assert cpp_backend.set_cuda_engine("cutlass_next") == "cutlass_trial" and _C.sm90_trial_features() == 0
        cpp_backend.set_cuda_engine("cutlass_trial")
        assert cpp_backend.set_cuda_engine("mma") == "cutlass_trial"
        assert not _C.sm90_engine_enabled() and not _C.sm90_next_enabled() and _C.sm90_trial_features() == 0
        with pytest.raises(ValueError, match="unknown sm90 kernel 'cudnn'"):
            _C.sm90_engine_launches("cudnn")
    finally:
        cpp_backend.set_cuda_engine(start)


def test_unknown_engine_is_refused_and_changes_nothing():
    start = cpp_backend.cuda_engine()
    with pytest.raises(ValueError, match="unknown CUDA engine 'cudnn'"):
        cpp_backend.set_cuda_engine("cudnn")
    assert cpp_backend.cuda_engine() == start


def test_cutlass_is_refused_where_it_was_not_built(monkeypatch):
    class WithoutEngine:
        def has_sm90_engine(self):
            return False

        def sm90_engine_enabled(self):
            return False

        def set_sm90_engine_enabled(self, enabled):
            assert not enabled, "an engine that was not built must not be enabled"

        def sm90_next_enabled(self):
            return False

        def set_sm90_next_enabled(self, enabled):
            assert not enabled, "an engine that was not built must not be enabled"

        def sm90_trial_features(self):
            return 0

        def set_sm90_trial_features(self, features):
            assert not features, "an engine that was not built must not be enabled"

    monkeypatch.setattr(cpp_backend, "_C", WithoutEngine())
    for engine in cpp_backend.HOPPER_ENGINES:
        with pytest.raises(RuntimeError, match=f"'{engine}' CUDA engine is not available.*CUTLASS and sm_90a"):
            cpp_backend.set_cuda_engine(engine)
    assert cpp_backend.set_cuda_engine("mma") == "mma"


def _engine_in_fresh_process(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSED_RESNET_CUDA_ENGINE": value}
    code = "from fused_resnet.ops import cpp_backend; print(cpp_backend.cuda_engine())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_chooses_the_engine():
    if not _C.has_sm90_engine():
        pytest.skip("_C was built without the sm90 engine")
    for engine in cpp_backend.CUDA_ENGINES:
        result = _engine_in_fresh_process(engine)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == engine
    result = _engine_in_fresh_process("fastest")
    assert result.returncode != 0 and "unknown CUDA engine 'fastest'" in result.stderr


def _route(shape_or_kind, dtype="bfloat16", residual=True, prologue=False, n=GPU_BATCH, hw=None) -> str:
    """The sm90 kernel that would take the call under the engine in use: "conv", "narrow-conv", "gemm", ... or ""
    (declined)."""
    if len(shape_or_kind) == 8:  # a RESNET_SHAPES entry
        cin, size, cout, k, stride, padding, dilation, groups = shape_or_kind
        hw = (size, size)
    else:  # a CONV_KINDS / EDGE_KINDS entry
        cin, cout, k, stride, padding, dilation, groups = shape_or_kind
    return _C.sm90_engine_route(
        dtype, (n, cin, *hw), (cout, cin // groups, k, k), (stride, stride), (padding, padding), (dilation, dilation),
        groups, residual, prologue,
    )  # fmt: skip


def _accepts(*args, **kwargs) -> bool:
    return _route(*args, **kwargs) != ""


def _on_next_kernels() -> bool:
    """Whether the engine in use runs the next kernels (GEMM path, narrow tiles, im2col rows)."""
    return cpp_backend.cuda_engine() in ("cutlass_next", "cutlass_trial")


def _trial_runs(feature: str) -> bool:
    """Whether the engine in use is the trial, with this change of it on (cpp_backend.TRIAL_FEATURES)."""
    return cpp_backend.cuda_engine() == "cutlass_trial" and feature in cpp_backend.trial_features()


def _padded(cin: int) -> bool:
    """Whether the engine in use pads the input's channels to 8 for the call (the trial's stem tiles, under 8
    channels)."""
    return cin < 8 and _trial_runs("stem-conv")


def _on_rows(cin: int, k: int, stride: int, padding: int) -> bool:
    """Whether the engine in use lays a call it takes out as im2col rows for its GEMM: on the next kernels, inputs of
    under 8 channels (not on the trial, which pads them) and 1x1 unpadded convs of stride 2-8 (the pixels they
    read)."""
    strided_pointwise = k == 1 and padding == 0 and 2 <= stride <= 8
    return _on_next_kernels() and not _padded(cin) and (cin < 8 or strided_pointwise)


def _expected_route(cin: int, cout: int, k: int, stride: int, padding: int, residual: bool) -> str:
    """The tests' own statement of the route (sm90_engine_route) of a call the engine in use takes."""
    if _on_rows(cin, k, stride, padding):
        return "im2col-gemm"
    return _expected_kernel(cin, cout, k, stride, padding, residual)


def _expected_kernel(cin: int, cout: int, k: int, stride: int, padding: int, residual: bool) -> str:
    """The tests' own statement of which sm90 kernel the engine in use runs a call it takes on."""
    if not _on_next_kernels():
        return "conv"
    if _padded(cin):
        cin = 8  # the call then runs as any other on 8 channels
    if (k, stride, padding) == (1, 1, 0) or _on_rows(cin, k, stride, padding):
        # A 1x1 stride-1 unpadded conv is a GEMM over the pixels; the rows path's, over the rows. The trial's GEMM
        # for calls with a residual has its own epilogue subtiles.
        return "gemm-wide-epilogue" if _trial_runs("gemm-wide-epilogue") and residual else "gemm"
    if _trial_runs("stem-conv") and cin <= 16 and not residual:
        return "stem-conv"  # 16-deep K steps for inputs of few channels; no residual (conv_sm90_cutlass.cuh)
    if cout <= 64:
        return "narrow-conv"
    # The trial's persistent conv takes no residual (conv_sm90_persistent.cuh).
    return "persistent-conv" if _trial_runs("persistent-conv") and not residual else "conv"


needs_engine_built = pytest.mark.skipif(not _C.has_sm90_engine(), reason="_C was built without the sm90 engine")


@needs_engine_built
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_engine_takes_every_resnet_conv_that_tma_can_address(residual):
    # CUTLASS's own host-side checks (can_implement: TMA alignment, im2col padding and corner limits; the output
    # extents it derives): every layer of the family with Cin and Cout multiples of 8 must pass them, so that on
    # the GPU these layers run on the engine rather than silently on the fallback.
    for dtype in ("bfloat16", "float16"):
        for shape in RESNET_SHAPES:
            cin, _, cout, k, stride, padding, _, _ = shape
            expected = ""
            if _takes(shape):
                expected = _expected_route(cin, cout, k, stride, padding, residual)
            assert _route(shape, dtype, residual) == expected, (dtype, shape)
        for batch in (1, 256):
            expected = _expected_kernel(64, 256, 1, 1, 0, residual)
            assert _route((64, 56, 256, 1, 1, 0, 1, 1), dtype, residual, n=batch) == expected


@needs_engine_built
def test_small_inputs_take_the_im2col_path_only_on_the_next_kernels():
    stem = (3, 64, 7, 2, 3, 1, 1)
    with cpp_backend.using_cuda_engine("cutlass_next"):
        assert _route(stem, hw=(224, 224), n=256) == "im2col-gemm"
        assert _route((1, 16, 3, 1, 1, 1, 1), hw=(32, 32)) == "im2col-gemm"  # a grayscale CIFAR stem
        assert _route((7, 16, 3, 2, 1, 2, 1), hw=(32, 32)) == "im2col-gemm"  # dilated, strided
        assert _route(stem, "float32", hw=(224, 224)) == ""
        assert _route(stem, prologue=True, hw=(224, 224)) == ""  # the rows would skip the prologue
        assert _route((3, 12, 7, 2, 3, 1, 1), hw=(224, 224)) == ""  # Cout 12: output rows off the 16-byte grid
        assert _route((4, 16, 3, 1, 1, 1, 2), hw=(32, 32)) == ""  # grouped
        assert _route((12, 16, 3, 1, 1, 1, 1), hw=(32, 32)) == ""  # 12 channels: neither path takes it
        assert _route((3, 16, 19, 1, 9, 1, 1), hw=(32, 32)) == ""  # 19x19x3 = 1083 values: rows past 1024
    with cpp_backend.using_cuda_engine("cutlass"):
        assert _route(stem, hw=(224, 224)) == ""


@needs_engine_built
def test_gemm_path_takes_only_pointwise_convs():
    with cpp_backend.using_cuda_engine("cutlass_next"):
        assert _route((64, 64, 1, 1, 0, 1, 1), hw=(56, 56)) == "gemm"
        # Stride 2: not a GEMM over the input's pixels, but over those it reads, gathered as rows first.
        assert _route((64, 128, 1, 2, 0, 1, 1), hw=(56, 56)) == "im2col-gemm"
        assert _route((64, 128, 1, 8, 0, 1, 1), hw=(56, 56)) == "im2col-gemm"
        assert _route((64, 128, 1, 9, 0, 1, 1), hw=(56, 56)) == ""  # past stride 8, as the implicit conv
        assert _route((2048, 128, 1, 2, 0, 1, 1), hw=(14, 14)) == "conv"  # rows of 2048: past 1024, the conv's
        assert _route((64, 128, 1, 2, 0, 1, 1), prologue=True, hw=(56, 56)) == ""
        assert _route((64, 128, 1, 1, 1, 1, 1), hw=(56, 56)) == "conv"  # padded: a zero border, not a GEMM
        assert _route((64, 128, 3, 1, 1, 1, 1), hw=(56, 56)) == "conv"
        assert _route((64, 64, 3, 1, 1, 1, 1), hw=(56, 56)) == "narrow-conv"  # at most 64 output channels
        assert _route((64, 72, 3, 1, 1, 1, 1), hw=(56, 56)) == "conv"
        assert _route((64, 64, 1, 1, 0, 2, 1), hw=(56, 56)) == "gemm"  # dilation means nothing for 1x1
        assert _route((12, 64, 1, 1, 0, 1, 1), hw=(56, 56)) == ""  # Cin 12: rows off the 16-byte grid
        assert _route((64, 64, 1, 1, 0, 1, 1), "float32", hw=(56, 56)) == ""
        assert _route((64, 64, 1, 1, 0, 1, 1), prologue=True, hw=(56, 56)) == ""
    with cpp_backend.using_cuda_engine("cutlass"):
        assert _route((64, 128, 1, 2, 0, 1, 1), hw=(56, 56)) == "conv"


@needs_engine_built
def test_trial_routes_wide_convs_residual_gemms_and_small_inputs_to_its_kernels():
    with cpp_backend.using_cuda_engine("cutlass_trial"):
        assert _route((64, 256, 1, 1, 0, 1, 1), hw=(56, 56)) == "gemm-wide-epilogue"
        assert _route((64, 256, 1, 1, 0, 1, 1), residual=False, hw=(56, 56)) == "gemm"  # nothing to load
        assert _route((128, 128, 3, 1, 1, 1, 1), residual=False, hw=(28, 28)) == "persistent-conv"
        assert _route((128, 128, 3, 1, 1, 1, 1), hw=(28, 28)) == "conv"  # a residual: the next kernels' conv
        assert _route((512, 512, 3, 2, 1, 1, 1), residual=False, hw=(14, 14)) == "persistent-conv"
        assert _route((24, 136, 3, 1, 0, 1, 1), residual=False, hw=(13, 10), n=3) == "persistent-conv"  # partial tiles
        assert _route((64, 128, 1, 1, 1, 1, 1), residual=False, hw=(56, 56)) == "persistent-conv"  # padded 1x1
        assert _route((64, 64, 3, 1, 1, 1, 1), residual=False, hw=(56, 56)) == "narrow-conv"
        assert _route((64, 72, 3, 1, 1, 1, 1), "float32", hw=(56, 56)) == ""
        # At most 16 input channels, no residual: the stem tiles (16-deep K steps), whatever the output's width.
        assert _route((16, 16, 3, 1, 1, 1, 1), residual=False, hw=(32, 32)) == "stem-conv"
        assert _route((8, 136, 3, 1, 1, 1, 1), residual=False, hw=(13, 10), n=3) == "stem-conv"
        assert _route((16, 16, 3, 1, 1, 1, 1), hw=(32, 32)) == "narrow-conv"  # a residual
        assert _route((24, 64, 3, 1, 1, 1, 1), residual=False, hw=(32, 32)) == "narrow-conv"  # 24 channels
        # The rows path takes its GEMM, either one.
        assert _route((64, 128, 1, 2, 0, 1, 1), hw=(56, 56)) == "im2col-gemm"
        assert _route((64, 128, 1, 2, 0, 1, 1), residual=False, hw=(56, 56)) == "im2col-gemm"
        # Under 8 channels: padded to 8, then the kernel any 8-channel call of that shape takes.
        assert _route((3, 64, 7, 2, 3, 1, 1), residual=False, hw=(224, 224), n=256) == "stem-conv"
        assert _route((3, 128, 7, 2, 3, 1, 1), residual=False, hw=(224, 224)) == "stem-conv"
        assert _route((1, 16, 3, 1, 1, 1, 1), hw=(32, 32)) == "narrow-conv"  # a grayscale CIFAR stem, a residual
        assert _route((4, 16, 1, 1, 0, 1, 1), hw=(32, 32)) == "gemm-wide-epilogue"  # 1x1, now 16-byte rows
        assert _route((4, 16, 1, 2, 0, 1, 1), residual=False, hw=(32, 32)) == "stem-conv"  # strided: not rows
        assert _route((3, 64, 7, 2, 3, 1, 1), "float32", hw=(224, 224)) == ""
        assert _route((3, 64, 7, 2, 3, 1, 1), prologue=True, hw=(224, 224)) == ""
        assert _route((4, 16, 3, 1, 1, 1, 2), hw=(32, 32)) == ""  # grouped
        assert _route((64, 64, 1, 1, 0, 1, 1), "float32", hw=(56, 56)) == ""
    with cpp_backend.using_cuda_engine("cutlass_next"):  # the trial's changes are its own
        assert _route((64, 256, 1, 1, 0, 1, 1), hw=(56, 56)) == "gemm"
        assert _route((128, 128, 3, 1, 1, 1, 1), hw=(28, 28)) == "conv"
        assert _route((3, 64, 7, 2, 3, 1, 1), residual=False, hw=(224, 224)) == "im2col-gemm"


@needs_engine_built
def test_trial_runs_only_the_changes_chosen():
    previous = cpp_backend.trial_features()
    stem = (3, 64, 7, 2, 3, 1, 1)
    try:
        with cpp_backend.using_cuda_engine("cutlass_trial"):
            assert cpp_backend.set_trial_features(["stem-conv"]) == tuple(cpp_backend.TRIAL_FEATURES)
            assert _C.sm90_trial_features() == 4 and cpp_backend.cuda_engine() == "cutlass_trial"
            assert _route((64, 256, 1, 1, 0, 1, 1), hw=(56, 56)) == "gemm"
            assert _route((128, 128, 3, 1, 1, 1, 1), residual=False, hw=(28, 28)) == "conv"
            assert _route(stem, residual=False, hw=(224, 224), n=256) == "stem-conv"
            cpp_backend.set_trial_features(["gemm-wide-epilogue", "persistent-conv"])
            assert cpp_backend.trial_features() == ("persistent-conv", "gemm-wide-epilogue")
            assert _C.sm90_trial_features() == 3
            assert _route(stem, residual=False, hw=(224, 224), n=256) == "im2col-gemm"  # not padded: the rows
            assert _route((128, 128, 3, 1, 1, 1, 1), residual=False, hw=(28, 28)) == "persistent-conv"
            assert _route((64, 256, 1, 1, 0, 1, 1), hw=(56, 56)) == "gemm-wide-epilogue"
            with pytest.raises(ValueError, match="at least one"):
                cpp_backend.set_trial_features([])
            with pytest.raises(ValueError, match="unknown trial features"):
                cpp_backend.set_trial_features(["stem-conv", "faster"])
            assert cpp_backend.trial_features() == ("persistent-conv", "gemm-wide-epilogue")  # unchanged
        # Chosen under another engine: in effect once the trial is.
        cpp_backend.set_trial_features(["stem-conv"])
        with cpp_backend.using_cuda_engine("cutlass_next"):
            assert _C.sm90_trial_features() == 0
            with cpp_backend.using_cuda_engine("cutlass_trial"):
                assert _C.sm90_trial_features() == 4
    finally:
        cpp_backend.set_trial_features(previous)


def test_engine_smoke_reports_a_failure_or_a_hang_in_one_line(monkeypatch):
    assert engine_smoke.failure("cutlass_next") is None  # it has run on GPUs: nothing to ask
    if not ON_SM90:  # the children's calls fail here (no GPU, or no engine): the reasons come back as one line
        why = engine_smoke.failure.__wrapped__("cutlass_trial")
        assert why is not None and why.startswith("cutlass_trial: ") and "\n" not in why, why
        assert why.count("cutlass_trial: ") == len(cpp_backend.TRIAL_FEATURES), why  # one child per kernel

    class Hangs:
        def __init__(self, cmd, **kwargs):
            self.cmd, self.killed, self.returncode = cmd, False, None

        def communicate(self, timeout=None):
            if not self.killed:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            return "", None

        def kill(self):
            self.killed = True

    monkeypatch.setattr(engine_smoke.subprocess, "Popen", Hangs)
    why = engine_smoke.failure.__wrapped__("cutlass_trial")
    assert "'stem-conv' kernel did not finish within" in why and "'persistent-conv' kernel did not finish" in why


def test_engine_smoke_leaves_out_the_trial_kernels_that_fail(monkeypatch):
    previous = cpp_backend.trial_features()
    reason = "cutlass_trial: its 'stem-conv' kernel is off by 1.00e+00 relative (tolerance 0.04)"
    monkeypatch.setattr(engine_smoke, "kernel_failures", lambda engine: {"stem-conv": reason})
    monkeypatch.setattr(engine_smoke, "_DROPPED", {})
    monkeypatch.setattr(cpp_backend, "_C", _FeatureSwitches())
    try:
        assert engine_smoke.failure.__wrapped__("cutlass_trial") is None  # the rest still runs
        assert cpp_backend.trial_features() == ("persistent-conv", "gemm-wide-epilogue")
        assert engine_smoke.dropped("cutlass_trial") == reason
        note = engine_note("cutlass_trial")  # the trial's bench rows say what ran and what was left out
        assert (
            "(persistent-conv, gemm-wide-epilogue)" in note
            and f"left out, as they failed their first call: {reason}" in note
        )
        every = {name: f"cutlass_trial: {name} failed" for name in cpp_backend.TRIAL_FEATURES}
        monkeypatch.setattr(engine_smoke, "kernel_failures", lambda engine: every)
        why = engine_smoke.failure.__wrapped__("cutlass_trial")  # nothing left: refused, with every reason
        assert why == "; ".join(every.values())
    finally:
        cpp_backend.set_trial_features(previous)


class _FeatureSwitches:
    """A stand-in for _C's engine switches (the engine off): set_trial_features consults cuda_engine()."""

    def sm90_engine_enabled(self):
        return False


@gpu
@needs_sm90
def test_trial_kernels_finish_and_match_conv2d_in_a_child_process():
    assert engine_smoke.kernel_failures("cutlass_trial") == {}


@needs_engine_built
@pytest.mark.usefixtures("cutlass_engine")
def test_engine_takes_the_edge_cases_and_declines_what_it_cannot_do():
    for kind in EDGE_KINDS.values():
        assert _accepts(kind, hw=(13, 10), n=3)
    layer = (64, 56, 64, 3, 1, 1, 1, 1)
    assert not _accepts(layer, "float32")
    assert not _accepts(layer, prologue=True)
    # The next kernels lay the 3-channel stem out as rows for the GEMM; the trial pads its channels to 8.
    cin, cout, k, stride, padding, _, _ = CONV_KINDS["stem7x7s2"]
    expected = _expected_route(cin, cout, k, stride, padding, residual=True) if _on_next_kernels() else ""
    assert _route(CONV_KINDS["stem7x7s2"], hw=(13, 10)) == expected
    assert not _accepts(CONV_KINDS["grouped3x3"], hw=(13, 10))
    assert not _accepts((12, 8, 1, 1, 0, 1, 1), hw=(13, 10))  # Cin 12: rows off the 16-byte grid
    # TMA's im2col mode limits the padding (at most 256 per side for 2-D convs) and the stride (at most 8).
    assert not _accepts((8, 8, 3, 1, 300, 1, 1), hw=(13, 10))
    assert _accepts((8, 8, 1, 8, 0, 1, 1), hw=(40, 40))
    assert not _accepts((8, 8, 1, 9, 0, 1, 1), hw=(40, 40))
    assert not _accepts((64, 64, 16, 16, 0, 1, 1), hw=(64, 64))  # a patchify conv
    assert _route((8, 8, 3, 0, 1, 1, 1), hw=(13, 10)) == ""  # stride 0: no conv (and no crash)
    assert _route((8, 8, 3, 1, 1, 1, 1), hw=(1, 1), n=0) == ""


# ------------------------------------------------------------------------------------------------- on the GPU
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and _C built with CUDA")
def test_engine_is_built_for_this_hopper_gpu():
    # Without this, a build that left the engine out (no CUTLASS headers on the GPU machine) skips every test below.
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not a compute capability 9.0 GPU")
    assert _C.has_sm90_engine(), "_C lacks the sm90 engine: build with CUTLASS's headers (see benchmarks/gpu_check.sh)"


IM2COL_CHUNK_BYTES = 256 << 20  # ops_cuda.cpp, kIm2colBytes: the im2col path's rows per GEMM launch


def _launches(x, w, out_hw, on_rows: bool) -> int:
    """Kernel launches of one engine call: one, or one per chunk of images on the im2col rows path (_on_rows)."""
    if not on_rows:
        return 1
    row_bytes = -(-w.shape[1] * w.shape[2] * w.shape[3] // 8) * 8 * x.element_size()
    chunk = max(1, min(IM2COL_CHUNK_BYTES // (out_hw[0] * out_hw[1] * row_bytes), x.shape[0]))
    return -(-x.shape[0] // chunk)


TILE_PIXELS = 128  # output pixels per M tile in every kernel of the engine


def _assert_each_tile_close(out, expected, dtype):
    """Each block of 128 output pixels within the tolerance on its own. _check_cuda's whole-tensor relative error
    would hide a wrong tile of a large output (one of the 80×224² stem test's moves it by about 1e-2, within bf16's
    4e-2). A block is measured against its own norm plus 1% of the average block's, so that a block of near-zero
    ReLU outputs is not judged by its rounding alone."""
    c = out.shape[1]
    got, want = (t.detach().permute(0, 2, 3, 1).reshape(-1, c).double() for t in (out, expected))  # pixel rows
    pad = (0, 0, 0, -got.shape[0] % TILE_PIXELS)
    diff = torch.nn.functional.pad(got - want, pad).reshape(-1, TILE_PIXELS * c).norm(dim=1)
    norm = torch.nn.functional.pad(want, pad).reshape(-1, TILE_PIXELS * c).norm(dim=1)
    worst = (diff / (norm + 0.01 * want.norm() / norm.numel() ** 0.5)).max().item()
    tol = tolerances.forward_rtol(dtype, "cuda")
    assert worst <= tol, f"a block of {TILE_PIXELS} output pixels is off by {worst:.2e} relative (tolerance {tol})"


def _check_on_engine(args, relu, dtype, expect_engine: bool):
    x, w, _, r, config, _, _ = args
    kernels = ("", "conv", "narrow-conv", "gemm", "persistent-conv", "gemm-wide-epilogue", "stem-conv")  # "": any
    before = {k: _C.sm90_engine_launches(k) for k in kernels}
    _assert_each_tile_close(*_check_cuda(args, relu, dtype), dtype)
    took = {k: _C.sm90_engine_launches(k) - before[k] for k in kernels}
    shape = (w.shape[1], w.shape[0], w.shape[2], config.stride[0], config.padding[0])  # cin, cout, k, stride, pad
    on_rows = _on_rows(shape[0], *shape[2:])
    launches = _launches(x, w, config.output_shape(x, w)[2:], on_rows) if expect_engine else 0
    assert took[""] == launches, f"the sm90 engine launched {took['']} kernels, expected {launches}"
    if expect_engine:
        kernel = _expected_kernel(*shape, residual=r is not None)
        assert took[kernel] == launches, f"expected the call on the {kernel!r} kernel, the launches were {took}"


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("residual", [True, False], ids=["res-relu", "plain"])
@pytest.mark.parametrize("dtype", ENGINE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=_shape_id)
def test_resnet_shapes(shape, dtype, residual):
    _check_on_engine(_cuda_case(shape, dtype, residual), residual, dtype, expect_engine=_takes(shape))


# Partial tiles in every direction (M, N and K smaller than or not a multiple of the 128×128×64 tile), padding 0,
# strides and dilations, at the smallest channel counts the engine takes (multiples of 8).
EDGE_KINDS = {
    "3x3s1-c8": (8, 8, 3, 1, 1, 1, 1),
    "3x3s2-c16o24": (16, 24, 3, 2, 1, 1, 1),
    "1x1s1-c8o16": (8, 16, 1, 1, 0, 1, 1),
    "1x1s1-c136o264": (136, 264, 1, 1, 0, 1, 1),  # GEMM path: partial tiles in M, N and K, 3 tiles along N and K
    "1x1s2-c16o8": (16, 8, 1, 2, 0, 1, 1),
    "3x3-nopad-c24o136": (24, 136, 3, 1, 0, 1, 1),
    "dilated3x3d2": (8, 8, 3, 1, 2, 2, 1),
    "dilated3x3d4": (16, 8, 3, 1, 4, 4, 1),
    "5x5s1-c72o40": (72, 40, 5, 1, 2, 1, 1),
}


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("epilogue", [(False, True), (True, True), (False, False), (True, False)], ids=str)
@pytest.mark.parametrize("dtype", ENGINE_DTYPES, ids=str)
@pytest.mark.parametrize("kind", EDGE_KINDS.values(), ids=EDGE_KINDS.keys())
def test_partial_tiles_and_epilogues(kind, dtype, epilogue):
    residual, relu = epilogue
    args = _make(kind, dtype, "cuda", residual=residual, n=3, hw=(13, 10))
    _check_on_engine(args, relu, dtype, expect_engine=True)


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("dtype", (*ENGINE_DTYPES, torch.float32), ids=str)
def test_declined_calls_run_on_the_hand_written_kernel(dtype):
    fp32 = dtype == torch.float32
    im2col = _on_next_kernels()  # takes the 3-channel stem
    for kind in ("stem7x7s2", "grouped3x3", "3x3s1"):  # Cin 3; groups 4; Cout 12
        expect = im2col and kind == "stem7x7s2" and not fp32
        _check_on_engine(_make(CONV_KINDS[kind], dtype, "cuda", n=2, hw=(13, 10)), True, dtype, expect_engine=expect)
    prologue = _make(EDGE_KINDS["3x3s1-c8"], dtype, "cuda", prologue=True, n=2, hw=(13, 10))
    _check_on_engine(prologue, True, dtype, expect_engine=False)
    x, w, b, r, config, s, t = _cuda_case((64, 28, 64, 3, 1, 1, 1, 1), dtype, residual=True, n=2)
    # A residual view 2 bytes off a 16-byte boundary: TMA cannot address it.
    buf = torch.empty(r.numel() + 1, dtype=dtype, device="cuda")
    r_mis = buf[1:].view(r.shape[0], r.shape[2], r.shape[3], r.shape[1]).permute(0, 3, 1, 2).copy_(r)
    assert r_mis.data_ptr() % 16 != 0
    _check_on_engine((x, w, b, r_mis, config, s, t), True, dtype, expect_engine=False)
    _check_on_engine((x, w, b, r, config, s, t), True, dtype, expect_engine=not fp32)


# Inputs of under 8 channels (partial rows, strides, dilation, padding, 1 to 7 channels) and 1x1 convs of stride 2-8
# (rows of whole pixels, loaded 16 bytes at once): the next kernels lay them out as im2col rows for the GEMM.
IM2COL_KINDS = {
    "stem7x7s2-c3o64": (3, 64, 7, 2, 3, 1, 1),
    "3x3s1-c1o16": (1, 16, 3, 1, 1, 1, 1),
    "3x3s2d2-c5o24": (5, 24, 3, 2, 2, 2, 1),
    "5x5s1-c7o136": (7, 136, 5, 1, 0, 1, 1),
    "1x1s2-c16o24": (16, 24, 1, 2, 0, 1, 1),
    "1x1s3-c136o8": (136, 8, 1, 3, 0, 1, 1),
}


@pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers for the host emulation")
@pytest.mark.parametrize("order", THREAD_ORDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", IM2COL_KINDS.values(), ids=IM2COL_KINDS.keys())
def test_im2col_rows_on_host(kind, dtype, order):
    # csrc/cuda/im2col.cu run on CPU tensors (tests/cuda_on_host.py; its grid limit shrunk, so the grid-stride
    # loop goes round several times): the rows of images 1 and 2 of 3 are their unfolded windows in (kh, kw, c)
    # order, bit for bit, zero past KH*KW*C; and the GEMM over them with the filter laid out as ops_cuda.cpp lays
    # it out (run_im2col_on_sm90) is the convolution.
    cin, cout, k, stride, pad, dil, _ = kind
    x = torch.randn(3, cin, 13, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    x[1, 0, 0, 0] = -0.0  # a bit copy keeps the sign of zero
    taps = k * k * cin
    depth = (taps + 7) // 8 * 8
    with thread_order(order):
        rows = im2col_rows(x, (k, k), (stride, stride), (pad, pad), (dil, dil), depth, n0=1, images=2)
    cols = torch.nn.functional.unfold(x[1:3].double(), k, dilation=dil, padding=pad, stride=stride)
    windows = cols.shape[-1]
    expected = torch.zeros(2 * windows, depth, dtype=torch.float64)
    expected[:, :taps] = cols.view(2, cin, k, k, windows).permute(0, 4, 2, 3, 1).reshape(2 * windows, taps)
    assert torch.equal(rows.view(torch.int16), expected.to(dtype).view(torch.int16))

    weight = torch.randn(cout, cin, k, k, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight_rows = torch.zeros(cout, depth, dtype=torch.float64)
    weight_rows[:, :taps] = weight.permute(0, 2, 3, 1).reshape(cout, taps)
    conv = torch.nn.functional.conv2d(x[1:3].double(), weight, stride=stride, padding=pad, dilation=dil)
    gemm = (rows.double() @ weight_rows.T).view(2, conv.shape[2], conv.shape[3], cout).permute(0, 3, 1, 2)
    torch.testing.assert_close(gemm, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers for the host emulation")
@pytest.mark.parametrize("off", [0, 1], ids=["on-16-bytes", "2-bytes-off"])
def test_im2col_rows_of_a_strided_1x1_conv(off):
    # A 1x1 conv's rows are the pixels it reads: 8 channels loaded at once where x sits on 16 bytes, value by value
    # where it does not. Both bit for bit the strided pixels.
    x = torch.randn(2, 16, 9, 7).to(torch.bfloat16)
    buf = torch.empty(x.numel() + 8, dtype=x.dtype)
    start = next(k for k in range(8) if (buf.data_ptr() + 2 * k) % 16 == 2 * off)
    placed = buf[start : start + x.numel()].view(2, 9, 7, 16).permute(0, 3, 1, 2).copy_(x)
    assert placed.data_ptr() % 16 == 2 * off and placed.is_contiguous(memory_format=torch.channels_last)
    rows = im2col_rows(placed, (1, 1), (2, 3), (0, 0), (1, 1), 16)
    expected = x[:, :, ::2, ::3].permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.equal(rows.view(torch.int16), expected.view(torch.int16))


@gpu
@needs_sm90
@pytest.mark.parametrize("epilogue", [(False, True), (True, True), (True, False)], ids=str)
@pytest.mark.parametrize("dtype", ENGINE_DTYPES, ids=str)
@pytest.mark.parametrize("kind", IM2COL_KINDS.values(), ids=IM2COL_KINDS.keys())
def test_im2col_path(kind, dtype, epilogue):
    residual, relu = epilogue
    with cpp_backend.using_cuda_engine("cutlass_next"):
        _check_on_engine(_make(kind, dtype, "cuda", residual=residual, n=3, hw=(29, 22)), relu, dtype, True)


@gpu
@needs_sm90
def test_im2col_path_in_chunks_keeps_nan_and_replays_in_a_graph():
    with cpp_backend.using_cuda_engine("cutlass_next"):
        # 80 images of 224x224: 3.8 MB of rows each, so two chunks of at most 256 MB (ops_cuda.cpp).
        args = _make(IM2COL_KINDS["stem7x7s2-c3o64"], torch.bfloat16, "cuda", residual=True, n=80, hw=(224, 224))
        x, w, b, r, config, _, _ = args
        assert _launches(x, w, (112, 112), on_rows=True) == 2  # the tests' own count agrees
        _check_on_engine(args, True, torch.bfloat16, expect_engine=True)
        x = x[:2].clone()
        x[1, 2, 100, 50] = float("nan")
        out = cpp_backend.conv_bias_act(x, w, b, None, config, False)
        expected = torch.nn.functional.conv2d(x.float(), w.float(), b, stride=2, padding=3)
        assert torch.equal(out.isnan(), expected.isnan()) and out[1].isnan().any() and not out[0].isnan().any()
        # All 80 images, so that the captured launches reuse one row buffer for both chunks; new values in the
        # captured input before the replay, which must then give what an eager call gives for them.
        x_all = torch.randn_like(args[0])
        cpp_backend.conv_bias_act(x_all, w, b, r, config, True)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the row buffer is allocated inside the capture
            captured = cpp_backend.conv_bias_act(x_all, w, b, r, config, True)
        x_all.copy_(torch.randn_like(x_all))
        graph.replay()
        eager = cpp_backend.conv_bias_act(x_all, w, b, r, config, True)
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
def test_relu_keeps_nan_and_padding_stays_zero():
    x, w, b, _, config, _, _ = _make(EDGE_KINDS["3x3s1-c8"], torch.bfloat16, "cuda", residual=False, n=1, hw=(6, 6))
    x[0, :, 0, 0] = float("nan")
    out = cpp_backend.conv_bias_act(x, w, b, None, config, True)
    expected = torch.relu(torch.nn.functional.conv2d(x.float(), w.float(), b, padding=1))
    assert torch.equal(out.isnan(), expected.isnan())  # NaN reaches exactly the windows that hold the pixel
    assert out.isnan().any()


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("shape", [(256, 14, 256, 3, 1, 1, 1, 1), (256, 14, 1024, 1, 1, 0, 1, 1)], ids=_shape_id)
def test_cuda_graph_replay_matches_eager(shape):
    x, w, b, r, config, _, _ = _cuda_case(shape, torch.bfloat16, residual=True, n=4)
    eager = cpp_backend.conv_bias_act(x, w, b, r, config, True)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cpp_backend.conv_bias_act(x, w, b, r, config, True)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    before = _C.sm90_engine_launches()
    with torch.cuda.graph(graph):
        captured = cpp_backend.conv_bias_act(x, w, b, r, config, True)
    assert _C.sm90_engine_launches() == before + 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@gpu
@needs_sm90
@pytest.mark.usefixtures("cutlass_engine")
@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_model_parity_against_torchvision(model):
    before = _C.sm90_engine_launches()
    rows = check_model(model, dtype=torch.bfloat16, device="cuda", shape=(GPU_BATCH, 3, 64, 64), backend="cuda")
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(map(str, failed))
    assert _C.sm90_engine_launches() > before
