"""The training path's passes over the conv output as Triton kernels (CUDA tensors; CPU under the interpreter).

A train-mode conv → BN → [+ residual] → [ReLU] unit reads its conv output y three times in all, each one pass:
  forward   1. per-channel (mean, M2) partials of y                       _stats_kernel
            2. out = act(y·scale + shift [+ r [·rs]])                     _normalize_kernel
  backward  3. g' = g·1[z > 0]; partial Σg', Σg'·(y − μ) [; store g']    _grad_sums_kernel
            4. dL/dy = a·g' + b·y + c                                     _grad_input_kernel
with z = y·scale + shift [+ r [·rs]] recomputed from y in 3 and 4 by the same helper that 2 uses, so the ReLU
mask is the forward's; rs, the residual's optional per-channel scale, sits behind a constexpr flag
(HAS_RESIDUAL_SCALE) that removes the multiply where it is absent. Every kernel takes (n, c, h·w) strides, so
channels_last and NCHW tensors run without copies; the tile is BLOCK_M pixels × BLOCK_C channels, math in the
accumulation dtype (fp32, or fp64 for fp64).

Partials are [P, C]: program p reduces rows [p·R, (p + 1)·R) in BLOCK_M chunks, merging chunk statistics with
Chan's pairwise update as it goes; the P partials are merged by stats.merge_partials (statistics) or summed
(gradient sums). Each launcher is a torch.library custom op so torch.compile traces it without a graph break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from .stats import BatchStats, accumulation_dtype, merge_partials

BLOCK_M = 64
_MAX_BLOCK_C = 64
# Enough programs along the rows to fill a GPU several times over, few enough that merging the partials is cheap.
_TARGET_PROGRAMS = 1024


@triton.jit
def _offsets(rows, cols, HW, stride_n, stride_hw, stride_c, DENSE_ROWS: tl.constexpr):
    # rows index N·H·W pixels: beyond 2**31 elements (large batches) offsets must be int64.
    rows = rows.to(tl.int64)
    if DENSE_ROWS:  # stride_n == HW·stride_hw (channels_last): no 64-bit division per row
        pixel = rows * stride_hw
    else:
        n = rows // HW
        pixel = n * stride_n + (rows - n * HW) * stride_hw
    return pixel[:, None] + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _channel_vectors(scale_ptr, shift_ptr, rs_ptr, cols, mask_c, HAS_RESIDUAL_SCALE: tl.constexpr):
    # The pre-activation's per-channel vectors; without a residual scale, rs is scale (never read).
    scale = tl.load(scale_ptr + cols, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=mask_c, other=0.0)
    if HAS_RESIDUAL_SCALE:
        rs = tl.load(rs_ptr + cols, mask=mask_c, other=0.0)
    else:
        rs = scale
    return scale, shift, rs


@triton.jit
def _pre_activation(
    y_ptr, y_offs, r_ptr, r_offs, scale, shift, rs, mask, HAS_RESIDUAL: tl.constexpr, HAS_RESIDUAL_SCALE: tl.constexpr
):  # fmt: skip
    # z = y·scale + shift [+ r [·rs]] in the accumulation dtype; the forward output and backward's mask both come
    # from this one function, so the recomputed mask is the forward's. Without rs, no multiply: z += r.
    y = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(scale.dtype)
    z = y * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + r_offs, mask=mask, other=0.0).to(scale.dtype)
        if HAS_RESIDUAL_SCALE:
            z += r * rs[None, :]
        else:
            z += r
    return y, z


@triton.jit
def _stats_kernel(
    y_ptr, mean_ptr, m2_ptr, M, C, HW, rows_per_program, stride_yn, stride_yhw, stride_yc,
    DENSE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    acc_dtype = mean_ptr.dtype.element_ty
    start = pid_m * rows_per_program
    mean = tl.zeros([BLOCK_C], dtype=acc_dtype)
    m2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    # ---- one chunk at a time: two-pass statistics of the chunk in registers, then Chan's pairwise merge
    for offset in range(0, rows_per_program, BLOCK_M):
        rows = start + offset + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_c[None, :]
        y = tl.load(
            y_ptr + _offsets(rows, cols, HW, stride_yn, stride_yhw, stride_yc, DENSE_ROWS), mask=mask, other=0.0
        )
        y = y.to(acc_dtype)
        n_a = tl.maximum(tl.minimum(M - start, offset), 0).to(acc_dtype)
        n_b = tl.maximum(tl.minimum(M - start - offset, BLOCK_M), 0).to(acc_dtype)
        mean_b = tl.sum(y, axis=0) / tl.maximum(n_b, 1.0)
        centered = tl.where(mask, y - mean_b[None, :], 0.0)
        m2_b = tl.sum(centered * centered, axis=0)
        # δ = μb − μa;  μ = μa + δ·nb/n;  M2 = M2a + M2b + δ²·na·nb/n
        delta = mean_b - mean
        weight_b = n_b / tl.maximum(n_a + n_b, 1.0)
        mean += delta * weight_b
        m2 += m2_b + delta * delta * n_a * weight_b
    # ---- store this program's partial
    out = pid_m * C + cols
    tl.store(mean_ptr + out, mean, mask=mask_c)
    tl.store(m2_ptr + out, m2, mask=mask_c)


@triton.jit
def _normalize_kernel(
    y_ptr, r_ptr, out_ptr, scale_ptr, shift_ptr, M, C, HW,
    stride_yn, stride_yhw, stride_yc, stride_rn, stride_rhw, stride_rc,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DENSE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, rs_ptr=None, HAS_RESIDUAL_SCALE: tl.constexpr = False,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    scale, shift, rs = _channel_vectors(scale_ptr, shift_ptr, rs_ptr, cols, mask_c, HAS_RESIDUAL_SCALE)
    y_offs = _offsets(rows, cols, HW, stride_yn, stride_yhw, stride_yc, DENSE_ROWS)
    r_offs = _offsets(rows, cols, HW, stride_rn, stride_rhw, stride_rc, DENSE_ROWS)
    _, z = _pre_activation(y_ptr, y_offs, r_ptr, r_offs, scale, shift, rs, mask, HAS_RESIDUAL, HAS_RESIDUAL_SCALE)
    if RELU:
        z = tl.where(z > 0, z, 0.0)
    # the output, like every tensor these kernels write, is laid out like y
    tl.store(out_ptr + y_offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(g_ptr, g_offs, z, mask, RELU: tl.constexpr):
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0)
    if RELU:
        g = tl.where(z > 0, g, 0.0)
    return g


@triton.jit
def _grad_sums_kernel(
    g_ptr, y_ptr, r_ptr, masked_ptr, scale_ptr, shift_ptr, mean_ptr, sum_g_ptr, sum_gy_ptr,
    M, C, HW, rows_per_program,
    stride_gn, stride_ghw, stride_gc, stride_yn, stride_yhw, stride_yc, stride_rn, stride_rhw, stride_rc,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STORE_MASKED: tl.constexpr, DENSE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, rs_ptr=None, HAS_RESIDUAL_SCALE: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    scale, shift, rs = _channel_vectors(scale_ptr, shift_ptr, rs_ptr, cols, mask_c, HAS_RESIDUAL_SCALE)
    mean = tl.load(mean_ptr + cols, mask=mask_c, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=scale.dtype)
    sum_gy = tl.zeros([BLOCK_C], dtype=scale.dtype)
    start = pid_m * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):
        rows = start + offset + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_c[None, :]
        y_offs = _offsets(rows, cols, HW, stride_yn, stride_yhw, stride_yc, DENSE_ROWS)
        r_offs = _offsets(rows, cols, HW, stride_rn, stride_rhw, stride_rc, DENSE_ROWS)
        g_offs = _offsets(rows, cols, HW, stride_gn, stride_ghw, stride_gc, DENSE_ROWS)
        y, z = _pre_activation(y_ptr, y_offs, r_ptr, r_offs, scale, shift, rs, mask, HAS_RESIDUAL, HAS_RESIDUAL_SCALE)
        g = _masked_grad(g_ptr, g_offs, z, mask, RELU)
        if STORE_MASKED:  # the shortcut's gradient, laid out like y (g may be an expanded view)
            tl.store(masked_ptr + y_offs, g, mask=mask)
        g = g.to(scale.dtype)
        sum_g += tl.sum(g, axis=0)
        sum_gy += tl.sum(g * tl.where(mask, y - mean[None, :], 0.0), axis=0)
    out = pid_m * C + cols
    tl.store(sum_g_ptr + out, sum_g, mask=mask_c)
    tl.store(sum_gy_ptr + out, sum_gy, mask=mask_c)


@triton.jit
def _grad_input_kernel(
    g_ptr, y_ptr, r_ptr, dy_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, c_ptr, M, C, HW,
    stride_gn, stride_ghw, stride_gc, stride_yn, stride_yhw, stride_yc, stride_rn, stride_rhw, stride_rc,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DENSE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, rs_ptr=None, HAS_RESIDUAL_SCALE: tl.constexpr = False,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    scale, shift, rs = _channel_vectors(scale_ptr, shift_ptr, rs_ptr, cols, mask_c, HAS_RESIDUAL_SCALE)
    a = tl.load(a_ptr + cols, mask=mask_c, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0)
    c = tl.load(c_ptr + cols, mask=mask_c, other=0.0)
    y_offs = _offsets(rows, cols, HW, stride_yn, stride_yhw, stride_yc, DENSE_ROWS)
    r_offs = _offsets(rows, cols, HW, stride_rn, stride_rhw, stride_rc, DENSE_ROWS)
    g_offs = _offsets(rows, cols, HW, stride_gn, stride_ghw, stride_gc, DENSE_ROWS)
    y, z = _pre_activation(y_ptr, y_offs, r_ptr, r_offs, scale, shift, rs, mask, HAS_RESIDUAL, HAS_RESIDUAL_SCALE)
    g = _masked_grad(g_ptr, g_offs, z, mask, RELU).to(scale.dtype)
    dy = a[None, :] * g + b[None, :] * y + c[None, :]
    tl.store(dy_ptr + y_offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# ---- launchers: check, allocate, launch; each a custom op (torch.compile traces it through its fake), whose CPU
# kernel runs only under the interpreter (unsupported() says so) -------------------------------------------------

from ..ops.checks import FLOAT_DTYPES  # noqa: E402
from ..ops.eager import plain_eager_call  # noqa: E402
from ..ops.launch_math import cdiv, next_power_of_2  # noqa: E402
from ..ops.triton_conv_bias_act import INTERPRET  # noqa: E402  (one definition of "the interpreter is on")

SUPPORTED_DTYPES = FLOAT_DTYPES


def unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    """Why these kernels cannot run on tensors of this device type and dtype (None when they can)."""
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels run CUDA tensors (CPU tensors under the interpreter), got a {device_type} tensor"
    if device_type == "cpu" and not INTERPRET:
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported; use one of {', '.join(map(str, SUPPORTED_DTYPES))}"
    return None


def _hw_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(n, h·w, c) strides where h and w collapse into one index (NCHW, channels_last, expanded), else None."""
    _, _, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if w == 1:
        return stride_n, stride_h, stride_c
    if h == 1 or stride_h == w * stride_w:
        return stride_n, stride_w, stride_c
    return None


def _dense_rows(hw: int, *strides: tuple[int, int, int]) -> bool:
    """Whether every tensor's pixels follow one another (n-stride = h·w · hw-stride), as in channels_last."""
    return all(stride_n == hw * stride_hw for stride_n, stride_hw, _ in strides)


def _readable(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _hw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _hw_strides(t)
    return t, strides


def _dense(y: torch.Tensor) -> torch.Tensor:
    # Outputs are allocated with y's strides, which must describe a dense, non-overlapping layout.
    if y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last):
        return y
    return y.contiguous()


def _like(y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty_strided(y.shape, y.stride(), dtype=dtype or y.dtype, device=y.device)


def _block_c(channels: int) -> int:
    return min(_MAX_BLOCK_C, max(16, next_power_of_2(channels)))


def rows_per_program(rows: int, channels: int) -> int:
    """Rows each reducing program covers (a multiple of BLOCK_M): about _TARGET_PROGRAMS programs in all."""
    programs_along_rows = max(1, _TARGET_PROGRAMS // cdiv(channels, _block_c(channels)))
    return BLOCK_M * max(1, cdiv(cdiv(rows, BLOCK_M), programs_along_rows))


def _shape(y: torch.Tensor) -> tuple[int, int, int]:
    n, c, h, w = y.shape
    return n * h * w, c, h * w


def _check_vectors(y: torch.Tensor, **vectors: torch.Tensor) -> None:
    acc = accumulation_dtype(y.dtype)
    for name, v in vectors.items():
        if v.shape != (y.shape[1],) or v.dtype != acc or v.device != y.device or not v.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {acc} vector of {y.shape[1]} values on {y.device}, "
                f"got {v.dtype} of shape {tuple(v.shape)} on {v.device}"
            )


def _check_like(y: torch.Tensor, name: str, t: torch.Tensor | None) -> None:
    if t is not None and (t.shape != y.shape or t.device != y.device):
        raise ValueError(
            f"{name} must have y's shape {tuple(y.shape)} on {y.device}, got {tuple(t.shape)} on {t.device}"
        )


def _check_residual(y: torch.Tensor, residual: torch.Tensor | None, residual_scale: torch.Tensor | None) -> None:
    _check_like(y, "residual", residual)
    if residual_scale is not None:
        if residual is None:
            raise ValueError("residual_scale scales the residual: it was given without a residual")
        _check_vectors(y, residual_scale=residual_scale)


def _residual_args(
    y: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor | None, residual_scale: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor, bool, bool]:
    """(r, r's strides, rs, HAS_RESIDUAL, HAS_RESIDUAL_SCALE) for a launch: y and scale stand in (never read) for
    an absent residual and residual scale."""
    r, r_strides = _readable(residual) if residual is not None else (y, _hw_strides(y))
    rs = residual_scale if residual_scale is not None else scale
    return r, r_strides, rs, residual is not None, residual_scale is not None


def _check_y(y: torch.Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(y.shape)}")
    reason = unsupported(y.device.type, y.dtype)
    if reason is not None:
        raise ValueError(reason)


_OP = {"mutates_args": (), "device_types": ("cuda", "cpu")}


def _partial_stats(y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program (mean, M2) partials of y per channel, each [P, C]; program p covers rows [p·rows, (p+1)·rows)."""
    _check_y(y)
    if rows <= 0 or rows % BLOCK_M:
        raise ValueError(f"rows_per_program must be a positive multiple of {BLOCK_M}, got {rows}")
    y, y_strides = _readable(y)
    m, c, hw = _shape(y)
    acc = accumulation_dtype(y.dtype)
    programs = cdiv(m, rows)
    mean = torch.empty((programs, c), dtype=acc, device=y.device)
    m2 = torch.empty_like(mean)
    if m and c:
        block_c = _block_c(c)
        grid = (programs, cdiv(c, block_c))
        _stats_kernel[grid](
            y, mean, m2, m, c, hw, rows, *y_strides,
            DENSE_ROWS=_dense_rows(hw, y_strides), BLOCK_M=BLOCK_M, BLOCK_C=block_c,
        )  # fmt: skip
    return mean, m2


def _normalize(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(y·scale + shift [+ residual [·residual_scale]]) in y's dtype and layout."""
    _check_y(y)
    _check_vectors(y, scale=scale, shift=shift)
    _check_residual(y, residual, residual_scale)
    y = _dense(y)
    out = _like(y)
    m, c, hw = _shape(y)
    if m and c:
        r, r_strides, rs, has_r, has_rs = _residual_args(y, scale, residual, residual_scale)
        block_c = _block_c(c)
        grid = (cdiv(m, BLOCK_M), cdiv(c, block_c))
        y_strides = _hw_strides(y)
        _normalize_kernel[grid](
            y, r, out, scale, shift, m, c, hw, *y_strides, *r_strides,
            HAS_RESIDUAL=has_r, RELU=relu, DENSE_ROWS=_dense_rows(hw, y_strides, r_strides),
            BLOCK_M=BLOCK_M, BLOCK_C=block_c, rs_ptr=rs, HAS_RESIDUAL_SCALE=has_rs,
        )  # fmt: skip
    return out


def _grad_sums(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
    rows: int,
    residual_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σg', Σg'·(y − mean), g' or an empty tensor) per channel, g' = g·1[y·scale + shift [+ residual [·residual_scale]]
    > 0]."""
    _check_y(y)
    _check_vectors(y, scale=scale, shift=shift, mean=mean)
    _check_like(y, "grad", g)
    _check_residual(y, residual, residual_scale)
    y = _dense(y)
    m, c, hw = _shape(y)
    acc = accumulation_dtype(y.dtype)
    programs = cdiv(m, rows)
    sum_g = torch.empty((programs, c), dtype=acc, device=y.device)
    sum_gy = torch.empty_like(sum_g)
    masked = _like(y, g.dtype) if store_masked else sum_g.new_empty(0)
    if m and c:
        g, g_strides = _readable(g)
        r, r_strides, rs, has_r, has_rs = _residual_args(y, scale, residual, residual_scale)
        block_c = _block_c(c)
        grid = (programs, cdiv(c, block_c))
        y_strides = _hw_strides(y)
        _grad_sums_kernel[grid](
            g, y, r, masked if store_masked else g, scale, shift, mean, sum_g, sum_gy, m, c, hw, rows,
            *g_strides, *y_strides, *r_strides,
            HAS_RESIDUAL=has_r, RELU=relu, STORE_MASKED=store_masked,
            DENSE_ROWS=_dense_rows(hw, g_strides, y_strides, r_strides), BLOCK_M=BLOCK_M, BLOCK_C=block_c,
            rs_ptr=rs, HAS_RESIDUAL_SCALE=has_rs,
        )  # fmt: skip
    return sum_g.sum(0), sum_gy.sum(0), masked


def _grad_input(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """a·g' + b·y + c per channel in y's dtype and layout, g' masked as in bn_grad_sums."""
    _check_y(y)
    _check_vectors(y, scale=scale, shift=shift, a=a, b=b, c=c)
    _check_like(y, "grad", g)
    _check_residual(y, residual, residual_scale)
    y = _dense(y)
    dy = _like(y)
    m, channels, hw = _shape(y)
    if m and channels:
        g, g_strides = _readable(g)
        r, r_strides, rs, has_r, has_rs = _residual_args(y, scale, residual, residual_scale)
        block_c = _block_c(channels)
        grid = (cdiv(m, BLOCK_M), cdiv(channels, block_c))
        y_strides = _hw_strides(y)
        _grad_input_kernel[grid](
            g, y, r, dy, scale, shift, a, b, c, m, channels, hw, *g_strides, *y_strides, *r_strides,
            HAS_RESIDUAL=has_r, RELU=relu, DENSE_ROWS=_dense_rows(hw, g_strides, y_strides, r_strides),
            BLOCK_M=BLOCK_M, BLOCK_C=block_c, rs_ptr=rs, HAS_RESIDUAL_SCALE=has_rs,
        )  # fmt: skip
    return dy


# The implementations above as torch.library ops, which torch.compile traces (with the fakes below) and autograd,
# dispatch modes and the profiler see; plain eager calls run the implementations directly (see _eager_or_op).
bn_partial_stats = torch.library.custom_op("fused_resnet::bn_partial_stats", _partial_stats, **_OP)
bn_normalize = torch.library.custom_op("fused_resnet::bn_normalize", _normalize, **_OP)
bn_grad_sums = torch.library.custom_op("fused_resnet::bn_grad_sums", _grad_sums, **_OP)
bn_grad_input = torch.library.custom_op("fused_resnet::bn_grad_input", _grad_input, **_OP)


@bn_partial_stats.register_fake
def _(y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, c, _ = _shape(y)
    mean = y.new_empty((cdiv(m, rows), c), dtype=accumulation_dtype(y.dtype))
    return mean, torch.empty_like(mean)


@bn_normalize.register_fake
def _(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return _like(_dense(y))


@bn_grad_sums.register_fake
def _(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
    rows: int,
    residual_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    masked = _like(_dense(y), g.dtype) if store_masked else scale.new_empty(0)
    return torch.empty_like(scale), torch.empty_like(scale), masked


@bn_grad_input.register_fake
def _(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
    residual_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return _like(_dense(y))


def _eager_or_op(op: Any, body: Callable[..., Any]) -> Callable[..., Any]:
    """The op, or in plain eager calls its body directly: the op's dispatch costs more host time than these
    kernels take on a GPU, and nothing needs it there (ops/eager.py)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return body(*args, **kwargs) if plain_eager_call(args[0]) else op(*args, **kwargs)

    run.__doc__ = body.__doc__
    return run


# The passes' entries (see passes.py for their arguments).
normalize = _eager_or_op(bn_normalize, _normalize)
grad_input = _eager_or_op(bn_grad_input, _grad_input)
_partial_stats_call = _eager_or_op(bn_partial_stats, _partial_stats)
_grad_sums_call = _eager_or_op(bn_grad_sums, _grad_sums)


def batch_stats(y: torch.Tensor, rows: int | None = None) -> BatchStats:
    """Per-channel (count, mean, M2) of y over N, H, W: the kernel's per-program partials merged by Chan's formula."""
    m, c, _ = _shape(y)
    rows = rows or rows_per_program(m, c)
    mean, m2 = _partial_stats_call(y, rows)
    starts = torch.arange(mean.shape[0], device=y.device, dtype=mean.dtype) * rows
    count = (m - starts).clamp(max=rows)[:, None].expand_as(mean)
    return merge_partials(BatchStats(count, mean, m2), dim=0)


def grad_sums(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
    residual_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, c, _ = _shape(y)
    rows = rows_per_program(m, c)
    sum_g, sum_gy, masked = _grad_sums_call(
        g, y, scale, shift, residual, mean, relu, store_masked, rows, residual_scale
    )
    return sum_g, sum_gy, masked if store_masked else None
