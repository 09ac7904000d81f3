"""The extension's simpler CUDA kernels run on CPU tensors, for CI without a GPU: the training passes
(csrc/cuda/bn_train.cu), the stem's im2col rows (csrc/cuda/im2col.cu) and its training max-pool
(csrc/cuda/max_pool.cu).

tests/cuda_host/ compiles each kernel file itself with g++ against a host emulation of CUDA's threads, blocks and
barriers (emulator.h) and exposes its launchers through C entry points. `host_cuda_passes()` wraps the training
passes in their interface (fused_resnet/training/passes.py), allocating what csrc/cuda/bn_train_ops.cpp allocates
and, as fused_resnet/training/cpp_passes.py does, handing a y in another layout than channels_last to the PyTorch
passes; `im2col_rows()` returns the rows launch_im2col writes; `max_pool()` and `max_pool_bn_act_backward()` what
max_pool.cu's launchers write, `pooled_size()` its output size; `emulated_cuda_ops_on_cpu()` puts such kernels
behind the CUDA-only ops as their CPU implementations, for fixtures that run the training path's branches that call
them. So the tests that hold every pass implementation to its formulas also hold these kernels' indexing, bounds,
vector paths, merge order and barriers to them, in each order of a block's threads (`thread_order`) and each
rows-per-thread setting. What only a GPU shows (code generation, speed) is left to the GPU check.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fused_resnet.training import torch_passes
from fused_resnet.training.passes import Passes
from fused_resnet.training.stats import BatchStats, accumulation_dtype

REPO = Path(__file__).resolve().parents[1]
_COMMON = ["tests/cuda_host/emulator.h", "csrc/cuda/elem.cuh", "csrc/cuda/kernel_launch.cuh", "csrc/cuda/launch.h"]
# Each harness: its C++ file (which includes the kernel file) first, then every file it depends on.
HARNESSES = {
    "bn_passes": ["tests/cuda_host/bn_passes.cpp", "csrc/cuda/bn_train.cu", "csrc/cuda/bn_math.cuh", *_COMMON],
    "im2col": ["tests/cuda_host/im2col.cpp", "csrc/cuda/im2col.cu", *_COMMON],
    "max_pool": ["tests/cuda_host/max_pool.cpp", "csrc/cuda/max_pool.cu", "csrc/cuda/bn_math.cuh", *_COMMON],
}
_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # launch.h's DType
_STATS, _NORMALIZE, _GRAD_SUMS, _GRAD_INPUT = range(4)


class _BnPassParams(ctypes.Structure):  # csrc/cuda/launch.h's BnPassParams, field for field
    _fields_ = [("dtype", ctypes.c_int)]
    _fields_ += [
        (name, ctypes.c_void_p)
        for name in (
            "y",
            "g",
            "residual",
            "residual_scale",
            "scale",
            "shift",
            "mean",
            "a",
            "b",
            "c",
            "out",
            "sum0",
            "sum1",
            "workspace",
        )
    ]
    _fields_ += [("rows", ctypes.c_int64), ("channels", ctypes.c_int64), ("relu", ctypes.c_bool)]


class _BnFinalizeParams(ctypes.Structure):  # csrc/cuda/launch.h's BnFinalizeParams, field for field
    _fields_ = [
        (name, ctypes.c_void_p) for name in ("gamma", "beta", "running_mean", "running_var", "invstd", "scale", "shift")
    ]
    _fields_ += [("count", ctypes.c_float), ("eps", ctypes.c_float), ("factor", ctypes.c_float)]


class _BnCoefficientParams(ctypes.Structure):  # csrc/cuda/launch.h's BnCoefficientParams, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in ("a", "invstd", "mean", "grad_gamma", "b", "c")]
    _fields_ += [("count", ctypes.c_float)]


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]
    for root in roots:
        if root and (Path(root) / "include/cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def unavailable() -> str | None:
    """Why the emulated kernels cannot be built here (no CUDA headers), or None."""
    if _cuda_include() is None:
        return "no CUDA toolkit headers (set CUDA_HOME): the kernels include cuda_bf16.h and cuda_runtime_api.h"
    return None


def _build(name: str) -> ctypes.CDLL:
    include = _cuda_include()
    assert include is not None, unavailable()
    sources = [REPO / path for path in HARNESSES[name]]
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]
    cmd += ["-DFUSED_RESNET_HOST_EMULATION", f"-I{REPO / 'csrc'}", f"-I{include}", str(sources[0])]
    digest = hashlib.sha256(" ".join(cmd).encode() + b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"fused_resnet_host_cuda_{name}_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the host emulation failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: parallel test workers may build it at the same time
    return ctypes.CDLL(str(lib))


def _check_layout(struct: type[ctypes.Structure], layout_of: Callable) -> None:
    """A ctypes mirror must be its launch.h struct: the same size and every field at the same offset."""
    names = [name for name, _ in struct._fields_]
    layout = (ctypes.c_longlong * (1 + len(names)))()
    layout_of(layout)
    mirror = [ctypes.sizeof(struct)] + [getattr(struct, name).offset for name in names]
    assert list(layout) == mirror, f"{struct.__name__} changed: C++ {list(layout)} vs ctypes {mirror}"


_HARNESSES: dict[str, ctypes.CDLL] = {}


def _harness(name: str) -> ctypes.CDLL:
    """The compiled harness (built on first use, cached by its sources' and command's hash across runs), set to
    run threads in the order of the innermost `thread_order`."""
    if name not in _HARNESSES:
        harness = _build(name)
        harness.fr_set_thread_order.argtypes = [ctypes.c_int]
        if name == "bn_passes":
            harness.fr_bn_pass.argtypes = [ctypes.c_int, ctypes.POINTER(_BnPassParams)]
            harness.fr_bn_workspace_elements.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
            harness.fr_bn_workspace_elements.restype = ctypes.c_longlong
            harness.fr_bn_stats_finalize.argtypes = [
                ctypes.POINTER(_BnPassParams),
                ctypes.POINTER(_BnFinalizeParams),
            ]
            harness.fr_bn_grad_sums_coefficients.argtypes = [
                ctypes.POINTER(_BnPassParams),
                ctypes.POINTER(_BnCoefficientParams),
            ]
            _check_layout(_BnPassParams, harness.fr_bn_params_layout)
            _check_layout(_BnFinalizeParams, harness.fr_bn_finalize_layout)
            _check_layout(_BnCoefficientParams, harness.fr_bn_coefficients_layout)
        elif name == "im2col":
            harness.fr_im2col.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 16 + [ctypes.c_void_p, ctypes.c_int]
        else:
            harness.fr_max_pool.argtypes = (
                [ctypes.c_int] * 2
                + [ctypes.c_void_p] * 6
                + [ctypes.c_longlong] * 6
                + [ctypes.c_int] * 6
                + [ctypes.c_bool]
            )
            harness.fr_pooled_size.argtypes = [ctypes.c_longlong] + [ctypes.c_int] * 3 + [ctypes.c_bool]
            harness.fr_pooled_size.restype = ctypes.c_longlong
            harness.fr_max_pool_backward_workspace_bytes.argtypes = [ctypes.c_longlong] * 4
            harness.fr_max_pool_backward_workspace_bytes.restype = ctypes.c_longlong
        _HARNESSES[name] = harness
    harness = _HARNESSES[name]
    harness.fr_set_thread_order(THREAD_ORDERS.index(_order))
    if name == "bn_passes":
        harness.fr_set_bn_rows_per_thread(_rows_per_thread)
    return harness


# The order in which the emulation runs a block's threads in each phase (emulator.h): a missing barrier shows in
# some order, so the tests run each kernel in every one.
THREAD_ORDERS = ("forward", "reverse", "shuffled")
_order = "forward"
# Rows per thread of the 16-byte training-pass kernels (launch.h: set_bn_rows_per_thread; 16-bit dtypes only).
ROWS_PER_THREAD = (1, 2, 4)
_rows_per_thread = 1


@contextlib.contextmanager
def thread_order(order: str) -> Iterator[None]:
    """Emulated launches inside run a block's threads in this order (THREAD_ORDERS)."""
    global _order
    assert order in THREAD_ORDERS, order
    previous, _order = _order, order
    try:
        yield
    finally:
        _order = previous


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    # A dense channels_last view (even one off the 16-byte boundary) is kept as it is, as the CUDA op keeps it.
    return t.contiguous(memory_format=torch.channels_last)


# Outputs start as NaN, so that a value a kernel never writes cannot pass for a right one (a 0 after a ReLU).
def _like(y: torch.Tensor) -> torch.Tensor:
    return torch.full_like(y, float("nan"), memory_format=torch.channels_last)


def _per_channel(y: torch.Tensor) -> torch.Tensor:
    # zeros where there is nothing to reduce, as bn_train_ops.cpp's per_channel_result
    fill = float("nan") if y.numel() else 0.0
    return torch.full((y.shape[1],), fill, dtype=accumulation_dtype(y.dtype))


_GUARD = 64  # NaN elements on each side of every buffer a kernel gets
_BYTE_GUARD = 0xFE  # byte buffers' guard


def _guarded(t: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A copy of dense t, in memory order, inside a NaN-filled buffer at the same address modulo 16 (the kernels
    choose their 16-byte paths by alignment): (buffer, offset, copy). A write past either end changes the NaNs; a
    read past them brings NaN into a reduction."""
    flat = t.as_strided((t.numel(),), (1,))  # dense: channels_last or 1-D contiguous
    buffer = torch.full((t.numel() + 2 * _GUARD + 16,), float("nan"), dtype=t.dtype)
    size = t.element_size()
    offset = next(k for k in range(_GUARD, _GUARD + 16) if (buffer.data_ptr() + k * size) % 16 == t.data_ptr() % 16)
    copy = buffer[offset : offset + t.numel()]
    copy.copy_(flat)
    return buffer, offset, copy


_OUTPUTS = ("out", "sum0", "sum1")  # BnPassParams' (the rest are inputs, never copied back)
# The passes whose merge kernel can go on to what follows it (launch.h): its parameters, entry point and outputs.
_EPILOGUES = {
    _STATS: (
        _BnFinalizeParams,
        "fr_bn_stats_finalize",
        ("running_mean", "running_var", "invstd", "scale", "shift"),
    ),
    _GRAD_SUMS: (_BnCoefficientParams, "fr_bn_grad_sums_coefficients", ("grad_gamma", "b", "c")),
}


def _run(which: int, y: torch.Tensor, epilogue: dict | None = None, **tensors: torch.Tensor | None) -> None:
    """Launches a pass on guarded copies of y and `tensors` (named as BnPassParams' fields; with `epilogue`, the
    tensors and numbers of the merge kernel's epilogue, named as the fields of _EPILOGUES' struct for the pass),
    checks that no kernel wrote outside them, and copies the outputs back."""
    harness = _harness("bn_passes")
    channels = y.shape[1]
    rows = y.numel() // channels if channels else 0
    relu = bool(tensors.pop("relu", False))
    if which in (_STATS, _GRAD_SUMS):
        workspace_size = harness.fr_bn_workspace_elements(rows, channels)
        tensors["workspace"] = torch.empty(workspace_size, dtype=accumulation_dtype(y.dtype))
    epilogue = dict(epilogue or {})
    numbers = {k: epilogue.pop(k) for k in ("count", "eps", "factor") if k in epilogue}
    given = ({"y": y, **tensors}, epilogue)  # a name may be in both (a vector the epilogue reads again): two copies
    guarded = {(name, i == 1): _guarded(t) for i, part in enumerate(given) for name, t in part.items() if t is not None}
    p = _BnPassParams(dtype=_DTYPES[y.dtype], rows=rows, channels=channels, relu=relu)
    struct, entry, epilogue_outputs = _EPILOGUES.get(which, (None, None, ()))
    e = struct(**numbers) if numbers else None
    for (name, in_epilogue), (_, _, copy) in guarded.items():
        setattr(e if in_epilogue else p, name, copy.data_ptr())
    if e is not None:
        err = getattr(harness, entry)(ctypes.byref(p), ctypes.byref(e))
    else:
        err = harness.fr_bn_pass(which, ctypes.byref(p))
    if err != 0:
        raise RuntimeError(f"emulated launch failed: cudaError_t {err}")
    for (name, in_epilogue), (buffer, offset, copy) in guarded.items():
        outside = torch.cat([buffer[:offset], buffer[offset + copy.numel() :]])
        assert outside.isnan().all(), f"a kernel wrote outside {name!r}"
        if name in (epilogue_outputs if in_epilogue else _OUTPUTS):
            given[in_epilogue][name].as_strided((copy.numel(),), (1,)).copy_(copy)


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous()


def _is_nhwc(y: torch.Tensor) -> bool:
    return y.is_contiguous(memory_format=torch.channels_last)


def stats(y: torch.Tensor) -> BatchStats:
    if not _is_nhwc(y):
        return torch_passes.batch_stats(y)
    mean, m2 = _per_channel(y), _per_channel(y)
    _run(_STATS, y, sum0=mean, sum1=m2)
    return BatchStats(torch.full_like(mean, y.numel() // y.shape[1] if y.shape[1] else 0), mean, m2)


def stats_finalize(
    y: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    count: float,
    eps: float,
    factor: float,
) -> tuple[torch.Tensor, ...]:
    """launch_bn_stats_finalize on a channels_last y: (mean, m2, invstd, scale, shift); updates the running stats
    in place where given (fp32 vectors)."""
    y = _nhwc(y)
    mean, m2, invstd, scale, shift = (_per_channel(y) for _ in range(5))
    finalize = dict(gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, invstd=invstd,
                    scale=scale, shift=shift, count=count, eps=eps, factor=factor)  # fmt: skip
    _run(_STATS, y, finalize, sum0=mean, sum1=m2)
    return mean, m2, invstd, scale, shift


def grad_sums_coefficients(g, y, scale, shift, residual, mean, invstd, relu, store_masked, count, residual_scale=None):
    """launch_bn_grad_sums_coefficients on a channels_last y, with the op's arguments and outputs (sum_g,
    grad_gamma, b, c, masked; masked empty unless stored)."""
    y, g = _nhwc(y), _nhwc(g)
    rs = _scale_of(residual, residual_scale)
    residual = None if residual is None else _nhwc(residual)
    sum_g, sum_gy, grad_gamma, b, c = (_per_channel(y) for _ in range(5))
    masked = _like(y) if store_masked else None
    coefficients = dict(a=_vec(scale), invstd=_vec(invstd), mean=_vec(mean), grad_gamma=grad_gamma, b=b, c=c,
                        count=count)  # fmt: skip
    _run(_GRAD_SUMS, y, coefficients, g=g, scale=_vec(scale), shift=_vec(shift), residual=residual,
         residual_scale=rs, mean=_vec(mean), out=masked, sum0=sum_g, sum1=sum_gy, relu=relu)  # fmt: skip
    return sum_g, grad_gamma, b, c, masked if store_masked else sum_g.new_empty(0)


def _scale_of(residual, residual_scale):
    """The residual scale as the kernels get it (the ops refuse one without a residual, as bn_train_ops.cpp)."""
    if residual_scale is None:
        return None
    if residual is None:
        raise ValueError("residual_scale scales the residual, but no residual was given")
    return _vec(residual_scale)


def normalize(y, scale, shift, residual, relu, residual_scale=None) -> torch.Tensor:
    if not _is_nhwc(y):
        return torch_passes.normalize(y, scale, shift, residual, relu, residual_scale)
    rs = _scale_of(residual, residual_scale)
    residual = None if residual is None else _nhwc(residual)
    out = _like(y)
    _run(_NORMALIZE, y, scale=_vec(scale), shift=_vec(shift), residual=residual, residual_scale=rs, out=out, relu=relu)
    return out


def grad_sums(g, y, scale, shift, residual, mean, relu, store_masked, residual_scale=None):
    if not _is_nhwc(y):
        return torch_passes.grad_sums(g, y, scale, shift, residual, mean, relu, store_masked, residual_scale)
    rs = _scale_of(residual, residual_scale)
    g = _nhwc(g)
    residual = None if residual is None else _nhwc(residual)
    sum_g, sum_gy = _per_channel(y), _per_channel(y)
    masked = _like(y) if store_masked else None
    _run(_GRAD_SUMS, y, g=g, scale=_vec(scale), shift=_vec(shift), residual=residual, residual_scale=rs,
         mean=_vec(mean), out=masked, sum0=sum_g, sum1=sum_gy, relu=relu)  # fmt: skip
    return sum_g, sum_gy, masked


def grad_input(g, y, scale, shift, residual, a, b, c, relu, residual_scale=None) -> torch.Tensor:
    if not _is_nhwc(y):
        return torch_passes.grad_input(g, y, scale, shift, residual, a, b, c, relu, residual_scale)
    rs = _scale_of(residual, residual_scale)
    g = _nhwc(g)
    residual = None if residual is None else _nhwc(residual)
    dy = _like(y)
    _run(_GRAD_INPUT, y, g=g, scale=_vec(scale), shift=_vec(shift), residual=residual, residual_scale=rs,
         a=_vec(a), b=_vec(b), c=_vec(c), out=dy, relu=relu)  # fmt: skip
    return dy


def _unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    if device_type != "cpu":
        return "the emulated CUDA kernels run CPU tensors"
    return None if dtype in _DTYPES else f"dtype {dtype} is not supported"


def _configured(order: str, rows_per_thread: int, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args):
        global _rows_per_thread
        assert rows_per_thread in ROWS_PER_THREAD, rows_per_thread
        previous, _rows_per_thread = _rows_per_thread, rows_per_thread
        try:
            with thread_order(order):
                return fn(*args)
        finally:
            _rows_per_thread = previous

    return run


def host_cuda_passes(order: str = "forward", rows_per_thread: int = 1) -> Passes:
    """The kernels as a training-pass implementation (passes.Passes) whose launches run threads in `order`, with
    `rows_per_thread` rows per round in the 16-byte kernels."""
    fns = (stats, normalize, grad_sums, grad_input)
    return Passes(*(_configured(order, rows_per_thread, fn) for fn in fns), _unsupported)


def im2col_rows(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    depth: int,
    n0: int = 0,
    images: int | None = None,
) -> torch.Tensor:
    """csrc/cuda/im2col.cu's rows [images·OH·OW, depth] for images [n0, n0 + images) of a 16-bit channels_last x."""
    n, c, h, w = x.shape
    images = n - n0 if images is None else images
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = (
        (size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw))
    )
    x = x.contiguous(memory_format=torch.channels_last)
    rows = torch.full((images * oh * ow, depth), float("nan"), dtype=x.dtype)  # NaN: a value never written shows
    (x_buffer, x_offset, x_copy), (buffer, offset, copy) = _guarded(x), _guarded(rows)
    err = _harness("im2col").fr_im2col(
        x_copy.data_ptr(), n, h, w, c, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, n0, images, copy.data_ptr(), depth
    )
    if err != 0:
        raise RuntimeError(f"emulated launch failed: cudaError_t {err}")
    for b, o, t in ((x_buffer, x_offset, x_copy), (buffer, offset, copy)):
        assert torch.cat([b[:o], b[o + t.numel() :]]).isnan().all(), "a kernel wrote outside its buffers"
    return copy.view(rows.shape)


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """csrc/cuda/max_pool.cu's pooled_size: windows along an axis, as torch's max-pool counts them."""
    return _harness("max_pool").fr_pooled_size(size, kernel, stride, pad, ceil_mode)


def _launch_max_pool(
    which: int,
    x: torch.Tensor,
    out: torch.Tensor,
    window: tuple,
    relu: bool = False,
    workspace_offset: int = 0,
    **vectors: torch.Tensor,
) -> torch.Tensor:
    """Runs a max_pool.cu launcher (0 forward, 1 backward) on guarded copies of x and `vectors` (g, scale, shift),
    into out (NaN to start with); checks that nothing was written outside them. The backward's workspace starts
    workspace_offset bytes past an aligned address."""
    (kh, kw), (sh, sw), (ph, pw) = window
    n, c, h, w = x.shape
    oh, ow = (vectors["g"] if which else out).shape[2:]
    tensors = {"x": _nhwc(x), "out": out, **{k: (_nhwc(v) if v.dim() == 4 else v) for k, v in vectors.items()}}
    guarded = {name: _guarded(t) for name, t in tensors.items()}
    ptr = {name: copy.data_ptr() for name, (_, _, copy) in guarded.items()}
    harness = _harness("max_pool")
    # The backward's byte per window and channel, between guard bytes; it starts as _BYTE_GUARD too, which names no
    # tap of a window the kernels take (at most 254 taps, 0-253) and is not "no winner" (255): a winner the first
    # pass did not write credits no pixel.
    size = harness.fr_max_pool_backward_workspace_bytes(n, c, oh, ow) + workspace_offset
    workspace = torch.full((size + 2 * _GUARD,), _BYTE_GUARD, dtype=torch.uint8)
    err = harness.fr_max_pool(
        which, _DTYPES[x.dtype], ptr["x"], ptr.get("g"), ptr.get("scale"), ptr.get("shift"), ptr["out"],
        workspace[_GUARD + workspace_offset :].data_ptr() if which else None, n, h, w, c, oh, ow, kh, kw, sh, sw, ph,
        pw, relu,
    )  # fmt: skip
    if err != 0:
        raise RuntimeError(f"emulated launch failed: cudaError_t {err}")
    for name, (buffer, offset, copy) in guarded.items():
        assert torch.cat([buffer[:offset], buffer[offset + copy.numel() :]]).isnan().all(), f"wrote outside {name}"
    outside = torch.cat([workspace[:_GUARD], workspace[workspace.numel() - _GUARD :]])
    assert (outside == _BYTE_GUARD).all(), "wrote outside the workspace"
    out.as_strided((out.numel(),), (1,)).copy_(guarded["out"][2])
    return out


def max_pool(x: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple, ceil_mode: bool) -> torch.Tensor:
    """max_pool.cu's forward over a channels_last x (16-byte channel vectors, dilation 1)."""
    n, c, h, w = x.shape
    oh, ow = (
        pooled_size(size, k, s, p, ceil_mode) for size, k, s, p in zip((h, w), kernel, stride, padding, strict=True)
    )
    out = torch.full((n, c, oh, ow), float("nan"), dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    return _launch_max_pool(0, x, out, (kernel, stride, padding))


def max_pool_bn_act_backward(
    g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool, kernel: tuple,
    stride: tuple, padding: tuple, workspace_offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """max_pool.cu's backward: dL/d act for act = act(y*scale + shift) pooled into g's shape (its workspace
    workspace_offset bytes off alignment, for tests of the launcher's checks)."""
    window = (kernel, stride, padding)
    return _launch_max_pool(1, y, _like(y), window, relu, workspace_offset, g=g, scale=scale, shift=shift)


def emulated_cuda_ops_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
    impls: dict[str, Callable],
    gate_module: object,
    gate_name: str,
    record: Callable[[str, tuple], object] = lambda name, args: name,
) -> Iterator[list]:
    """For a fixture: each CUDA-only op of `impls` with its host-emulated kernels (tests/cuda_on_host.py) as its
    CPU implementation, and the check that chooses those ops (gate_module.gate_name, which takes device_type="cuda"
    by default) told to choose them on CPU, so that the branch of the training path that calls them runs in CI.
    Yields the calls, each as record(op name, its arguments)."""
    from fused_resnet.ops import cpp_backend

    if unavailable() is not None or cpp_backend.unavailable("cpu") is not None:
        pytest.skip("needs the extension and CUDA headers")
    calls: list = []
    lib = torch.library.Library("fused_resnet_C", "IMPL")
    for name, fn in impls.items():

        def impl(*args, _name: str = name, _fn: Callable = fn):
            calls.append(record(_name, args))
            return _fn(*args)

        lib.impl(name, impl, "CPU")
    gate = getattr(gate_module, gate_name)
    monkeypatch.setattr(gate_module, gate_name, lambda *args: gate(*args, device_type="cpu"))
    try:
        yield calls
    finally:
        lib._destroy()
