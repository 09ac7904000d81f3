"""The C++/CUDA extension (fused_resnet._C) as the "cpu" and "cuda" backends.

The extension defines its ops in C++ under its own namespace (torch.ops.fused_resnet_C.*) with CPU and CUDA
kernels; this module adds what the dispatcher needs from Python (fake tensors and autograd) and exposes
them as Backend entries. The package imports and runs without the extension: then both backends report
themselves unavailable. An extension built against another torch is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import torch

from ..backends import Backend
from .checks import conv_allows_tf32, cuda_capability
from .conv_bias_act_autograd import call_with_config, register_fake_and_autograd
from .conv_config import ConvConfig

BUILD_COMMAND = "`pip install --no-build-isolation -e .` in the fused_resnet checkout"
REBUILD_HINT = f"rebuild it with {BUILD_COMMAND}"
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ExtensionMismatchError(ImportError):
    """fused_resnet._C exists but was built for another torch (or cannot be loaded by this one)."""


def _load_extension() -> tuple[ModuleType | None, str | None]:
    """The extension module, or None and why not. Raises ExtensionMismatchError for a stale build."""
    try:
        module = importlib.import_module("fused_resnet._C")
    except ModuleNotFoundError as err:
        if err.name != "fused_resnet._C":
            raise
        return None, f"fused_resnet._C is not built (build it with {BUILD_COMMAND}, without FUSED_RESNET_SKIP_EXT=1)"
    except ImportError as err:  # e.g. undefined symbols: compiled against another torch's ABI
        raise ExtensionMismatchError(
            f"fused_resnet._C cannot be loaded by torch {torch.__version__} ({err}); {REBUILD_HINT}"
        ) from err
    built_with = module.torch_version()
    if built_with != torch.__version__:
        raise ExtensionMismatchError(
            f"fused_resnet._C was built against torch {built_with} but torch {torch.__version__} is installed; "
            f"{REBUILD_HINT}"
        )
    return module, None


_C, _MISSING = _load_extension()


def ops_built(names: Iterable[str]) -> bool:
    """Whether the extension is built, with every op named (the caller then registers their fakes itself: torch
    wants each from the module its schema names). An op missing from a built extension means it was built from
    older sources: ExtensionMismatchError."""
    if _C is None:
        return False
    for name in names:
        if not hasattr(torch.ops.fused_resnet_C, name):
            raise ExtensionMismatchError(
                f"fused_resnet._C has no op {name}: it was built from older sources; {REBUILD_HINT}"
            )
    return True


def _fake_bias_residual_relu(
    y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)


def _setup_bias_residual_relu(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, bias, residual, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(output if relu else None)


# out = act(y + b + r):  g' = g·1[out > 0] (relu),  dL/dy = dL/dr = g',  dL/db = Σ_{n,h,w} g'
def _backward_bias_residual_relu(ctx: Any, grad: torch.Tensor) -> tuple:
    (out,) = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (out > 0).to(grad.dtype)
    need_y, need_b, need_r = ctx.needs_input_grad[:3]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_b = grad.sum(dim=(0, 2, 3), dtype=acc).to(ctx.bias_dtype) if need_b else None
    return grad if need_y else None, grad_b, grad if (need_r and ctx.has_residual) else None, None


def _fake_into_residual(*args: Any) -> None:
    return None


if _C is not None:
    register_fake_and_autograd("fused_resnet_C::conv_bias_act")
    torch.library.register_fake("fused_resnet_C::conv_bias_act_into_residual", _fake_into_residual)
    torch.library.register_fake("fused_resnet_C::bias_residual_relu", _fake_bias_residual_relu)
    torch.library.register_autograd(
        "fused_resnet_C::bias_residual_relu", _backward_bias_residual_relu, setup_context=_setup_bias_residual_relu
    )


def _conv_bias_act_op(*args: Any) -> torch.Tensor:
    # Looked up at call time: the op exists only once _C has loaded.
    return torch.ops.fused_resnet_C.conv_bias_act(*args)


# act(conv(pre(x), weight) + bias + residual) on the extension's kernel for x's device (autograd-capable).
conv_bias_act = call_with_config(_conv_bias_act_op)


def _op_below_autograd(*args: Any) -> torch.Tensor:
    # Without autograd the op's Python autograd kernel would only redispatch below itself: start there.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fused_resnet_C.conv_bias_act.default(*args)


# The same without autograd (Backend.launch: eager callers that need no gradient).
launch = call_with_config(_op_below_autograd)


def _into_residual_op(*args: Any) -> torch.Tensor:
    torch.ops.fused_resnet_C.conv_bias_act_into_residual(*args)
    residual = args[3]  # now holding the result
    if not residual.is_inference():  # so that autograd sees the write, should anything have saved the residual
        torch.autograd.graph.increment_version(residual)
    return residual


# The same, written into the residual's memory (CPU; no autograd: for inference callers whose residual is dead).
conv_bias_act_into_residual = call_with_config(_into_residual_op)


def has_cpu_input_scans() -> bool:
    """Whether the extension's CPU conv has the NaN scans' switch (csrc/cpu/input_scans.h)."""
    return _C is not None and hasattr(_C, "set_cpu_input_scans_enabled")


def cpu_input_scans() -> bool:
    """Whether this thread's CPU convs scan their activations for NaN (True where the extension has no switch)."""
    return not has_cpu_input_scans() or _C.cpu_input_scans_enabled()


def set_cpu_input_scans(enabled: bool) -> bool:
    """Turns this thread's NaN scans of the CPU conv's activations on or off; returns the previous setting. Off only
    where the activations are known finite (models/_common.py: forward_checked)."""
    return _C.set_cpu_input_scans_enabled(enabled)


def allow_prepacking(weight: torch.Tensor) -> None:
    """Declares a CPU weight stable (kept and only changed through version-counted writes), so that the CPU
    backend may cache its oneDNN-layout copy; see csrc/cpu/weight_cache.h."""
    if _C is not None and weight.device.type == "cpu":
        torch.ops.fused_resnet_C.allow_prepacking(weight)


def bias_residual_relu(
    y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """act(y + bias[c] + residual), channels_last, in y's dtype (the conv epilogue alone)."""
    return torch.ops.fused_resnet_C.bias_residual_relu(y, bias, residual, relu)


# The CUDA op's engines:
# - "mma": the hand-written tensor-core kernel (csrc/cuda/conv_bias_act_kernel.cuh, compute capability 8.0+, every
#   call);
# - "cutlass": the Hopper engine's implicit-GEMM conv (csrc/cuda/conv_sm90_cutlass.cuh) for the calls it can take
#   on a compute capability 9.0 GPU, the hand-written kernel for the others;
# - "cutlass_next": the Hopper engine's next kernels, on top of "cutlass": 1x1 stride-1 convs run as a persistent
#   ping-pong GEMM (csrc/cuda/conv_sm90_gemm.cuh), whose epilogues overlap its main loops; convs of at most 64
#   output channels on 128x64 tiles, two CTAs per SM (conv_sm90_cutlass.cuh, NarrowTile); inputs of under 8
#   channels (the RGB stem) and 1x1 stride-2 convs (projection shortcuts) as that GEMM over rows gathered from the
#   input (im2col rows of the stem's 7x7 windows; the shortcut's strided pixels) (launch.cu, ops_cuda.cpp).
# - "cutlass_trial": "cutlass_next" with the changes the next GPU run is to judge against it (launch.h,
#   set_sm90_trial_features; TRIAL_FEATURES below): convs of over 64 output channels without a residual that the
#   GEMM does not take on a persistent ping-pong kernel (conv_sm90_persistent.cuh; ResNet-50's 3x3 layers ran at
#   0.68-0.80x of cuDNN's conv on CUTLASS's non-persistent one), 64x64 epilogue subtiles on the GEMM for 1x1 layers
#   with a residual (conv_sm90_gemm.cuh says why), and inputs of under 8 channels (the RGB stem) padded by zeros to 8
#   for the implicit conv instead of laid out as im2col rows (launch.h, sm90_padded_channels), on tiles with 16-deep K
#   steps for inputs of at most 16 channels (conv_sm90_cutlass.cuh, StemTile). Their layers are disjoint, so one
#   engine shows each in the per-layer rows.
# "cutlass_next" is the default where the Hopper engine was built. On an H100 it passed the GPU tests (every
# ResNet-family conv shape of tests/test_cuda_sm90_engine.py) and compute-sanitizer, and ran ResNet-50 b256 bf16
# inference at 25,156 img/s against 20,094 for "cutlass" and 13,596 for "mma", in the same run
# (benchmarks/results/2026-11-27_H100_run2). "cutlass" had replaced "mma" the same way on an H200 (21,703 against
# 14,075 img/s, benchmarks/results/2026-11-27_H200_run1).
CUDA_ENGINES = ("mma", "cutlass", "cutlass_next", "cutlass_trial")
HOPPER_ENGINES = ("cutlass", "cutlass_next", "cutlass_trial")
NEXT_ENGINES = ("cutlass_next", "cutlass_trial")  # those running the next kernels
DEFAULT_CUDA_ENGINE = "cutlass_next"
# The trial's changes, each named by the route of the kernel it adds, with its bit in the extension's mask (launch.h,
# Sm90TrialFeature). "cutlass_trial" runs those of trial_features(): all, unless a caller left some out
# (engine_smoke.py does where a kernel fails its first run, so that the others are still measured).
TRIAL_FEATURES = {"persistent-conv": 1, "gemm-wide-epilogue": 2, "stem-conv": 4}
_trial_features: tuple[str, ...] = tuple(TRIAL_FEATURES)


def _trial_mask() -> int:
    return sum(TRIAL_FEATURES[name] for name in _trial_features)


def trial_features() -> tuple[str, ...]:
    """The changes the "cutlass_trial" engine runs (see TRIAL_FEATURES)."""
    return _trial_features


def set_trial_features(names: Iterable[str]) -> tuple[str, ...]:
    """Chooses the changes the "cutlass_trial" engine runs (at least one; in effect at once where it is the engine
    in use); returns the previous choice."""
    global _trial_features
    wanted = set(names)
    unknown = wanted - set(TRIAL_FEATURES)
    if unknown:
        raise ValueError(f"unknown trial features {sorted(unknown)}; choose from {', '.join(TRIAL_FEATURES)}")
    if not wanted:
        raise ValueError("the trial runs at least one of its changes; the 'cutlass_next' engine is the trial without")
    previous, running = _trial_features, cuda_engine() == "cutlass_trial"
    _trial_features = tuple(name for name in TRIAL_FEATURES if name in wanted)
    if running:
        _C.set_sm90_trial_features(_trial_mask())
    return previous


def sm90_engine_built() -> bool:
    """Whether _C holds the Hopper engine (built with CUTLASS's headers for sm_90a)."""
    return _C is not None and _C.has_sm90_engine()


def set_cuda_engine(name: str) -> str:
    """Chooses the CUDA op's engine for this process (see CUDA_ENGINES); returns the previous choice. The choice
    applies when a kernel launches: a CUDA graph replays the engine that ran at capture."""
    if name not in CUDA_ENGINES:
        raise ValueError(f"unknown CUDA engine {name!r}; choose one of {', '.join(map(repr, CUDA_ENGINES))}")
    previous = cuda_engine()
    if name in HOPPER_ENGINES and not sm90_engine_built():
        why = _MISSING or f"fused_resnet._C was built without it (needs CUTLASS and sm_90a); {REBUILD_HINT}"
        raise RuntimeError(f"the {name!r} CUDA engine is not available: {why}")
    if _C is not None:
        _C.set_sm90_trial_features(_trial_mask() if name == "cutlass_trial" else 0)
        _C.set_sm90_next_enabled(name in NEXT_ENGINES)
        _C.set_sm90_engine_enabled(name in HOPPER_ENGINES)
    return previous


def cuda_engine() -> str:
    """The CUDA op's engine now in use (see CUDA_ENGINES)."""
    if _C is None or not _C.sm90_engine_enabled():
        return "mma"
    if not _C.sm90_next_enabled():
        return "cutlass"
    return "cutlass_trial" if _C.sm90_trial_features() else "cutlass_next"


def sm90_engine_runs_on(device: torch.device) -> bool:
    """Whether the 'cutlass' engine can run convs on this device: built into _C, and a compute capability 9.0 GPU
    (its kernels are sm_90a code)."""
    if device.type != "cuda" or not sm90_engine_built():
        return False
    return cuda_capability(device) == (9, 0)


@contextlib.contextmanager
def using_cuda_engine(name: str) -> Iterator[None]:
    """set_cuda_engine(name) for the body of a with-statement, then the previous engine again."""
    previous = set_cuda_engine(name)
    try:
        yield
    finally:
        set_cuda_engine(previous)


if os.environ.get("FUSED_RESNET_CUDA_ENGINE"):
    set_cuda_engine(os.environ["FUSED_RESNET_CUDA_ENGINE"])
elif sm90_engine_built():
    set_cuda_engine(DEFAULT_CUDA_ENGINE)


@torch.compiler.assume_constant_result
def _hopper_engine_enabled(device_index: int) -> bool:
    # Constant under torch.compile: choose the engine before compiling.
    return cuda_engine() in HOPPER_ENGINES and sm90_engine_runs_on(torch.device("cuda", device_index))


def prefer_on_hopper(x: torch.Tensor) -> bool:
    """Whether "auto" should take the cuda backend before triton for x: 16-bit CUDA tensors where the Hopper engine
    runs. Measured on an H200, ResNet-50 b256 bf16 inference: the cuda backend 21,703 img/s with it, triton 14,009
    (benchmarks/results/2026-11-27_H200_run1); its convs beat the stock conv + BN + add + ReLU on 23 of the 24
    layer shapes (run2). On an H100: 25,156 img/s ('cutlass_next') against triton's 17,014
    (benchmarks/results/2026-11-27_H100_run2)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _hopper_engine_enabled(x.device.index if x.device.index is not None else 0)


def unavailable(device_type: str) -> str | None:
    """Why the extension cannot run on this device type here (None when it can)."""
    if _C is None:
        return _MISSING
    if device_type == "cuda":
        if not _C.has_cuda():
            return f"fused_resnet._C was built without CUDA kernels (no nvcc at build time); {REBUILD_HINT}"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def _unsupported(
    device_type: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
    prologue: bool = False,
) -> str | None:
    if x.device.type != device_type:
        return f"the {device_type!r} backend runs {device_type} tensors, got a tensor on {x.device}"
    if device_type == "cpu":
        return None  # every dtype, conv geometry and the prologue
    if x.dtype not in _CUDA_DTYPES:
        return f"the CUDA kernels run float16, bfloat16 and float32 (as TF32), not {x.dtype}"
    if x.dtype == torch.float32 and not conv_allows_tf32():
        return "float32 runs on TF32 tensor cores, but TF32 is disabled (torch.backends.cudnn.allow_tf32 = False)"
    major, minor = cuda_capability(x.device)
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async); got {major}.{minor}"
    n, _, oh, ow = config.output_shape(x, weight)
    if n * oh * ow >= 2**31 - 256:
        return f"N*OH*OW = {n * oh * ow} output pixels exceed the kernels' 32-bit row index; split the batch"
    if config.groups > 65535:
        return f"groups={config.groups} exceeds the CUDA grid limit of 65535"
    return None


def backend(name: str) -> Backend:
    """The extension's backend for one device type: name is "cpu" or "cuda"."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"the extension provides the 'cpu' and 'cuda' backends, not {name!r}")
    return Backend(
        name=name,
        conv_bias_act=conv_bias_act,
        unavailable=functools.partial(unavailable, name),
        unsupported=functools.partial(_unsupported, name),
        conv_bias_act_into_residual=conv_bias_act_into_residual if name == "cpu" else None,
        launch=launch,
        auto_first=prefer_on_hopper if name == "cuda" else None,
    )
