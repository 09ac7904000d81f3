"""conv → + bias → [+ residual] → [ReLU] as one Triton kernel: an implicit GEMM over NHWC.

rows = output pixels (N·OH·OW), columns = output channels of one group, reduction = KH·KW·Cin/groups with Cin
innermost, so that both operand tiles are contiguous along the reduction in channels_last memory. With a
prologue (in_scale/in_shift), each input value becomes relu(x·scale[c] + shift[c]) as it is loaded.

Kernel → launcher → op. The launch configuration comes from the tuned table (triton_tuned_configs.json, written
by `python -m fused_resnet.ops.triton_tune`) for the current GPU and layer shape, else from a heuristic, so that a
normal run never autotunes.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from . import triton_gemm_tma
from .checks import check_conv_bias_act, conv_allows_tf32
from .conv_bias_act_autograd import SCHEMA, register_fake_and_autograd
from .conv_config import ConvConfig
from .launch_math import cdiv, next_power_of_2
from .triton_tiles import grouped_tile


@triton.jit
def _pixel_offset(n, h, w, stride_n, stride_h, stride_w):
    # A batch of large images exceeds 2**31 elements (e.g. 1024×64×224×224): offsets are int64.
    return n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w


@triton.jit
def _tap(
    x_tile, w_cols, ih0, iw0, kh, kw, H, W, mask_m, stride_xh, stride_xw, stride_wh, stride_ww,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
):  # fmt: skip
    ih = ih0 + kh * DIL_H
    iw = iw0 + kw * DIL_W
    valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return x_tile + (kh * DIL_H * stride_xh + kw * DIL_W * stride_xw), w_cols + (kh * stride_wh + kw * stride_ww), valid


@triton.jit
def _round_to_tf32(v):
    # Hopper's tensor cores read only the top 10 mantissa bits of a TF32 operand that sits in shared memory, which
    # truncates every operand toward zero; rounded to nearest first (ties away, as cvt.rna.tf32.f32 and cuDNN do),
    # the errors stop adding up with one sign through the network (measured on an H200: ResNet-18 fp32 logits
    # 5.6e-3 off with truncation, against 4.3e-4 for cuDNN's TF32).
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _prologue(a, mask_a, channel, mask_k, scale_ptr, shift_ptr, ACC: tl.constexpr):
    """relu(a·scale[c] + shift[c]) for a pre-activation unit; `channel` holds each column's input channel."""
    scale = tl.load(scale_ptr + channel, mask=mask_k, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + channel, mask=mask_k, other=0.0).to(ACC)
    pre = a.to(ACC) * scale[None, :] + shift[None, :]
    pre = tl.where(pre < 0, 0.0, pre)
    # Zero padding applies after the prologue: padded pixels must stay 0, not relu(shift).
    return tl.where(mask_a, pre, 0.0).to(a.dtype)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if INPUT_PRECISION == "tf32":  # (the 16-bit types pass "tf32" too, which they ignore)
        if DOT_DTYPE == tl.float32:
            a = _round_to_tf32(a)
            b = _round_to_tf32(b)
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _accumulate_channels(
    acc, x_tap, valid, w_tap, mask_n, c0, C_IN_G, c_in_first, scale_ptr, shift_ptr, stride_xc, stride_wc,
    PROLOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_k = c0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < C_IN_G
    mask_a = valid[:, None] & mask_k[None, :]
    a = tl.load(x_tap[:, None] + offs_k[None, :] * stride_xc, mask=mask_a, other=0.0)
    if PROLOGUE:
        a = _prologue(a, mask_a, c_in_first + offs_k, mask_k, scale_ptr, shift_ptr, acc.dtype)
    b = tl.load(w_tap[None, :] + offs_k[:, None] * stride_wc, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return _dot(a, b, acc, DOT_DTYPE, INPUT_PRECISION)


@triton.jit
def _accumulate_packed(
    acc, x_tile, w_cols, ih0, iw0, mask_m, mask_n, k0, K_TOTAL, C_IN_G, H, W, c_in_first, scale_ptr, shift_ptr,
    stride_xc, stride_xh, stride_xw, stride_wc, stride_wh, stride_ww,
    KW: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    PROLOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Blocks of the whole reduction KH·KW·Cin (in the weight's channels_last order: kh, kw, then c) instead of
    # one tap's channels at a time: with few input channels (the 3-channel stem, ResNeXt's 4 per group) a per-tap block
    # would be mostly masked-off channels, and in NHWC the (kw, c) pairs of one row are contiguous anyway.
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K_TOTAL
    kh = offs_k // (KW * C_IN_G)
    kw = (offs_k // C_IN_G) % KW
    c = offs_k % C_IN_G
    ih = ih0[:, None] + (kh * DIL_H)[None, :]
    iw = iw0[:, None] + (kw * DIL_W)[None, :]
    mask_a = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_k = (kh * DIL_H).to(tl.int64) * stride_xh + (kw * DIL_W).to(tl.int64) * stride_xw + c.to(tl.int64) * stride_xc
    a = tl.load(x_tile[:, None] + x_k[None, :], mask=mask_a, other=0.0)
    if PROLOGUE:
        a = _prologue(a, mask_a, c_in_first + c, mask_k, scale_ptr, shift_ptr, acc.dtype)
    w_k = kh * stride_wh + kw * stride_ww + c * stride_wc
    b = tl.load(w_cols[None, :] + w_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return _dot(a, b, acc, DOT_DTYPE, INPUT_PRECISION)


@triton.jit
def _conv_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, y_ptr,
    M, H, W, OH, OW, C_IN_G, C_OUT_G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, PROLOGUE: tl.constexpr, RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UNROLL_TAPS: tl.constexpr, PACK_TAPS: tl.constexpr,
):  # fmt: skip
    # ----------------------------------------------------------- program id -> (conv group, output tile)
    group = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, C_OUT_G, BLOCK_M, BLOCK_N, GROUP_M)

    # ----------------------------------------------------------- output pixels (rows), channels (columns)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT_G
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = offs_m // (OW * OH)
    c_out = group * C_OUT_G + offs_n
    c_in_first = group * C_IN_G
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # Pointers to input pixel (ih0, iw0), the top-left tap of each output pixel (masked where it is padding).
    x_tile = x_ptr + c_in_first * stride_xc + _pixel_offset(n, ih0, iw0, stride_xn, stride_xh, stride_xw)
    w_cols = w_ptr + c_out.to(tl.int64) * stride_wo

    # ----------------------------------------------------------- accumulate over taps × channel blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if PACK_TAPS:
        k_total = KH * KW * C_IN_G
        for k0 in range(0, k_total, BLOCK_K):
            acc = _accumulate_packed(
                acc, x_tile, w_cols, ih0, iw0, mask_m, mask_n, k0, k_total, C_IN_G, H, W, c_in_first, scale_ptr,
                shift_ptr, stride_xc, stride_xh, stride_xw, stride_wc, stride_wh, stride_ww,
                KW, DIL_H, DIL_W, PROLOGUE, DOT_DTYPE, INPUT_PRECISION, BLOCK_K,
            )  # fmt: skip
    elif UNROLL_TAPS:
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                x_tap, w_tap, valid = _tap(
                    x_tile, w_cols, ih0, iw0, kh, kw, H, W, mask_m, stride_xh, stride_xw, stride_wh, stride_ww,
                    DIL_H, DIL_W,
                )  # fmt: skip
                for c0 in range(0, C_IN_G, BLOCK_K):
                    acc = _accumulate_channels(
                        acc, x_tap, valid, w_tap, mask_n, c0, C_IN_G, c_in_first, scale_ptr, shift_ptr,
                        stride_xc, stride_wc, PROLOGUE, DOT_DTYPE, INPUT_PRECISION, BLOCK_K,
                    )  # fmt: skip
    else:
        # One flat loop over (tap, channel block): with few channel blocks per tap this gives the software
        # pipeliner a long loop to overlap loads with MMAs, which per-tap loops of 1–2 iterations do not.
        k_blocks = tl.cdiv(C_IN_G, BLOCK_K)
        for step in range(0, KH * KW * k_blocks):
            tap = step // k_blocks
            kh = tap // KW
            kw = tap % KW
            x_tap, w_tap, valid = _tap(
                x_tile, w_cols, ih0, iw0, kh, kw, H, W, mask_m, stride_xh, stride_xw, stride_wh, stride_ww,
                DIL_H, DIL_W,
            )  # fmt: skip
            acc = _accumulate_channels(
                acc, x_tap, valid, w_tap, mask_n, (step - tap * k_blocks) * BLOCK_K, C_IN_G, c_in_first,
                scale_ptr, shift_ptr, stride_xc, stride_wc, PROLOGUE, DOT_DTYPE, INPUT_PRECISION, BLOCK_K,
            )  # fmt: skip

    # ----------------------------------------------------------- epilogue: bias, residual, ReLU, one cast
    acc += tl.load(bias_ptr + c_out, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    y_off = _pixel_offset(n, oh, ow, stride_yn, stride_yh, stride_yw)[:, None] + c_out[None, :] * stride_yc
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + y_off, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, as torch.relu does

    # ----------------------------------------------------------- store
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


# The kernel object tells whether TRITON_INTERPRET was set when it was defined, which is what decides how it runs.
INTERPRET = not isinstance(_conv_bias_act_kernel, triton.JITFunction)

TUNED_CONFIGS_PATH = Path(__file__).with_name("triton_tuned_configs.json")

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
_DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def supported_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """fp64 only under the interpreter (for gradcheck): GPU fp64 MMAs are not worth a tuned path."""
    if device_type == "cpu" or INTERPRET:
        return (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of the kernel (tile sizes, tile order, loop structure, warps, stages)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    unroll_taps: bool = True
    num_warps: int = 4
    num_stages: int = 3
    # Reduction blocks span the taps (kh, kw, c) instead of one tap's channels: for layers with few channels.
    pack_taps: bool = False
    # 1×1 stride-1 layers as a plain GEMM with TMA copies (triton_gemm_tma.py): chosen by the tuner only.
    tma: bool = False


def _pow2_at_least_16(n: int) -> int:
    # tl.dot needs every tile side >= 16 on tensor cores.
    return max(16, next_power_of_2(n))


def _clamp(config: KernelConfig, c_in_g: int, c_out_g: int, taps: int, k_max: int) -> KernelConfig:
    reduction = c_in_g * taps if config.pack_taps else c_in_g
    return KernelConfig(
        block_m=config.block_m,
        block_n=min(config.block_n, _pow2_at_least_16(c_out_g)),
        block_k=min(config.block_k, _pow2_at_least_16(reduction), k_max),
        group_m=config.group_m,
        unroll_taps=config.unroll_taps and not config.pack_taps,  # packed: there are no per-tap loops to unroll
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        pack_taps=config.pack_taps,
        tma=config.tma,
    )


def _k_max(dtype: torch.dtype) -> int:
    # 4-byte operands double the shared memory per stage: keep BLOCK_K at 32 so 3–4 stages still fit.
    return 64 if dtype in (torch.float16, torch.bfloat16) else 32


# The autotune search space, before clamping to the layer. num_warps=8 entries are kept but every config is
# validated before use (PyTorch issue #173068: Triton convs have silently miscompiled with num_warps=8).
CANDIDATES = tuple(
    KernelConfig(bm, bn, bk, 8, unroll, warps, stages)
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 4, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 32, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (256, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
    )
    for unroll in (False, True)
)


_LARGEST_BLOCK_M = max(c.block_m for c in CANDIDATES)


def _unroll_allowed(kh: int, kw: int) -> bool:
    # One tap: both loop structures are the same loop. Past 3×3, unrolling compiles for minutes (a 7×7 stem
    # unrolled took over 5 min of ptxas) for loops that are then too short to pipeline anyway.
    return 1 < kh * kw <= 9


def _packing_allowed(c_in_g: int, kh: int, kw: int) -> bool:
    # Fewer channels than the smallest MMA reduction (16): a per-tap block would be mostly masked-off lanes (the
    # 3-channel stem used 3 of every 16). One tap: packing changes nothing.
    return c_in_g < 16 and kh * kw > 1


# The TMA GEMM's search space (1×1 stride-1 layers, 16-bit dtypes, GPUs with TMA): (BLOCK_M, BLOCK_N, BLOCK_K,
# warps, stages). Shared memory per stage is (BLOCK_M + BLOCK_N)·BLOCK_K·2 bytes, plus the output tile's. The
# two-stage entries are for layers with one or two K blocks (Cin 64, 128), which have nothing to pipeline: their
# smaller footprint lets more programs share an SM, so one's epilogue overlaps another's loads.
TMA_CANDIDATES = tuple(
    KernelConfig(bm, bn, bk, 8, False, warps, stages, tma=True)
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 4, 2),
        (128, 256, 64, 8, 2),
    )
)


def candidate_configs(
    c_in_g: int, c_out_g: int, kh: int, kw: int, dtype: torch.dtype, tma: bool = False
) -> list[KernelConfig]:
    """The autotune list for one layer: the candidates clamped to the layer's channels, without duplicates
    (with both reduction orders where packing the taps is allowed). tma=True (the caller checked that the layer is
    a GEMM and the GPU has TMA) adds the TMA GEMM's candidates for 16-bit dtypes."""
    configs = []
    for config in CANDIDATES:
        if config.unroll_taps and not _unroll_allowed(kh, kw):
            continue
        for pack in (False, True) if _packing_allowed(c_in_g, kh, kw) else (False,):
            clamped = _clamp(replace(config, pack_taps=pack), c_in_g, c_out_g, kh * kw, _k_max(dtype))
            if clamped not in configs:
                configs.append(clamped)
    if tma and dtype in (torch.float16, torch.bfloat16):
        for config in TMA_CANDIDATES:
            clamped = _clamp(config, c_in_g, c_out_g, kh * kw, _k_max(dtype))
            if clamped not in configs:
                configs.append(clamped)
    return configs


def default_config(
    c_in_g: int, c_out_g: int, kh: int, kw: int, dtype: torch.dtype, interpret: bool = False
) -> KernelConfig:
    """The heuristic config used when the tuned table has no entry (and always under the interpreter)."""
    if interpret:
        # The interpreter's cost is Python work per program and loop step, nearly independent of the tile size:
        # few programs are fast, while 32-wide channel blocks still give the small test shapes several blocks.
        pack = _packing_allowed(c_in_g, kh, kw)
        config = KernelConfig(64, 32, 32, group_m=4, unroll_taps=_unroll_allowed(kh, kw), pack_taps=pack)
        return _clamp(config, c_in_g, c_out_g, kh * kw, 32)
    # On the GPU the per-tap reduction order, packing being a tuner candidate only: for the ResNet-50 stem (Cin 3,
    # 7×7) on an H200 the packed order took 8.46 ms per b256 bf16 call (benchmarks/results/2026-11-27_H200_run2)
    # against 3.8 ms for the per-tap config the tuner had chosen, which is what this heuristic gives that layer.
    block_n = min(128, _pow2_at_least_16(c_out_g))
    # 128×128 fp32 accumulators with 4 warps spill once the residual tile joins them in the epilogue (ptxas,
    # sm_90): stay at 128×64 or 64×128 by default and leave larger tiles to the tuner.
    tiles = KernelConfig(64 if block_n == 128 else 128, block_n, 64)
    config = _clamp(tiles, c_in_g, c_out_g, kh * kw, _k_max(dtype))
    # Per-tap loops of 1–3 channel blocks are too short to pipeline: use the flat loop there.
    unroll = _unroll_allowed(kh, kw) and cdiv(c_in_g, config.block_k) >= 4
    return KernelConfig(config.block_m, config.block_n, config.block_k, 8, unroll, 4, 4)


def dtype_tag(dtype: torch.dtype, device_type: str) -> str:
    """The dtype as the tuned table names it; fp32 runs as TF32 on GPU when cuDNN may use TF32."""
    if dtype == torch.float32 and device_type == "cuda" and conv_allows_tf32():
        return "tf32"
    return _DTYPE_TAGS[dtype]


def shape_key(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], config: ConvConfig, dtype: torch.dtype, device_type: str
) -> str:
    """The tuned table's key of a layer: dtype, batch rounded up to a power of two, input, filter and conv."""
    n, c, h, w = x_shape
    cout, _, kh, kw = w_shape
    return (
        f"{dtype_tag(dtype, device_type)}/n{next_power_of_2(n)}/c{c}h{h}w{w}/o{cout}k{kh}x{kw}"
        f"/s{config.stride[0]}x{config.stride[1]}p{config.padding[0]}x{config.padding[1]}"
        f"d{config.dilation[0]}x{config.dilation[1]}g{config.groups}"
    )


@functools.cache
def tuned_table() -> dict[str, dict[str, dict]]:
    """{GPU name: {shape key: KernelConfig fields}} from the committed JSON file."""
    if not TUNED_CONFIGS_PATH.exists():
        return {}
    return json.loads(TUNED_CONFIGS_PATH.read_text())


@functools.cache
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def kernel_config_for(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], config: ConvConfig, dtype: torch.dtype, device: torch.device
) -> KernelConfig:
    """The tuned config of this layer on this GPU, else the heuristic default."""
    # Memoized: working it out cost ~40 µs of host time per launch. The TF32 flag is part of the key because the
    # table names fp32 layers by it.
    tf32 = dtype == torch.float32 and conv_allows_tf32()
    return _kernel_config_for(x_shape, w_shape, config, dtype, device.type, device.index, tf32, INTERPRET)


@functools.lru_cache(maxsize=4096)
def _kernel_config_for(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    config: ConvConfig,
    dtype: torch.dtype,
    device_type: str,
    device_index: int | None,
    tf32: bool,
    interpret: bool,
) -> KernelConfig:
    c_out, c_in_g, kh, kw = w_shape
    if device_type != "cuda" or interpret:
        return default_config(c_in_g, c_out // config.groups, kh, kw, dtype, interpret=True)
    entry = tuned_table().get(_gpu_name(device_index), {}).get(shape_key(x_shape, w_shape, config, dtype, "cuda"))
    if entry is not None:
        return KernelConfig(**entry)
    return default_config(c_in_g, c_out // config.groups, kh, kw, dtype)


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    config: ConvConfig,
    relu: bool,
    kernel_config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launches the kernel on checked operands; returns a channels_last tensor in x's dtype.

    kernel_config overrides the table/heuristic choice (tests and the tuner use it).
    """
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    out_shape = config.output_shape(x, weight)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    # Read once per launch: it keys both the config lookup and the kernel's MMA precision.
    tf32 = x.dtype == torch.float32 and conv_allows_tf32()
    if kernel_config is None:
        kernel_config = _kernel_config_for(
            tuple(x.shape), tuple(weight.shape), config, x.dtype, x.device.type, x.device.index, tf32, INTERPRET
        )
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = bias.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    prologue = in_scale is not None
    if prologue:
        in_scale, in_shift = in_scale.contiguous(), in_shift.contiguous()
    elif kernel_config.tma and triton_gemm_tma.takes(x, weight, residual, config):
        triton_gemm_tma.launch(x, weight, bias, residual, y, relu, kernel_config, INTERPRET)
        return y

    has_residual = residual is not None
    consts = _constexprs(x.dtype, tf32, INTERPRET, (kh, kw), config, has_residual, prologue, relu, kernel_config)
    m = n * out_shape[2] * out_shape[3]
    c_out_g = c_out // config.groups
    grid = (cdiv(m, kernel_config.block_m) * cdiv(c_out_g, kernel_config.block_n), config.groups)
    # Triton launches on the current device, which need not be x's.
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _conv_bias_act_kernel[grid](
            x, weight, bias, residual, in_scale, in_shift, y,
            m, h, w, out_shape[2], out_shape[3], c_in_g, c_out_g,
            *x.stride(), *weight.stride(), *y.stride(),
            **consts,
        )  # fmt: skip
    return y


@functools.lru_cache(maxsize=1024)
def _constexprs(
    dtype: torch.dtype,
    tf32: bool,
    interpret: bool,
    kernel_hw: tuple[int, int],
    config: ConvConfig,
    has_residual: bool,
    prologue: bool,
    relu: bool,
    kernel_config: KernelConfig,
) -> dict[str, Any]:
    """The kernel's compile-time arguments and launch options for one kind of call (memoized: working them out
    took a tenth of the launcher's host time)."""
    tl_dtype = _TL_DTYPES[dtype]
    return dict(
        KH=kernel_hw[0], KW=kernel_hw[1],
        STRIDE_H=config.stride[0], STRIDE_W=config.stride[1],
        PAD_H=config.padding[0], PAD_W=config.padding[1],
        DIL_H=config.dilation[0], DIL_W=config.dilation[1],
        HAS_RESIDUAL=has_residual, PROLOGUE=prologue, RELU=relu,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        # The triton 3.8 interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those integers: upcast
        # bf16 tiles to fp32 there (exact, and what the tensor cores compute) so the interpreter stays a reference.
        DOT_DTYPE=tl.float32 if interpret and dtype == torch.bfloat16 else tl_dtype,
        # Only fp32 operands read the precision; the interpreter always computes exact fp32 products.
        INPUT_PRECISION="ieee" if interpret or (dtype == torch.float32 and not tf32) else "tf32",
        BLOCK_M=kernel_config.block_m, BLOCK_N=kernel_config.block_n, BLOCK_K=kernel_config.block_k,
        GROUP_M=kernel_config.group_m, UNROLL_TAPS=kernel_config.unroll_taps, PACK_TAPS=kernel_config.pack_taps,
        num_warps=kernel_config.num_warps, num_stages=kernel_config.num_stages,
    )  # fmt: skip


def _conv_config(stride: list[int], padding: list[int], dilation: list[int], groups: int) -> ConvConfig:
    for name, value, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != 2 or min(value) < least:
            raise ValueError(f"{name} must be two integers >= {least}, got {list(value)}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return ConvConfig(tuple(stride), tuple(padding), tuple(dilation), groups)


def _check_prologue(x: torch.Tensor, in_scale: torch.Tensor | None, in_shift: torch.Tensor | None) -> None:
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift come together (a folded pre-activation BN): give both or neither")
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is None:
            continue
        if tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), one per input channel, got {tuple(t.shape)}")
        if t.dtype != torch.float32 and t.dtype != x.dtype:
            raise TypeError(f"{name} must be float32 (or the input dtype), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move both to one device")


def size_limit_reason(x_shape: tuple[int, ...], w_shape: tuple[int, ...], config: ConvConfig) -> str | None:
    """Why the kernel's index types or grid cannot cover this call (None when they can)."""
    oh, ow = config.output_hw(x_shape[2], x_shape[3], w_shape[2], w_shape[3])
    rows = x_shape[0] * oh * ow
    if rows > 2**31 - 1 - _LARGEST_BLOCK_M:
        return f"N*OH*OW = {rows} output pixels exceed the kernel's 32-bit row index; split the batch"
    if config.groups > 65535:
        return f"groups={config.groups} exceeds the CUDA grid limit of 65535"
    return None


def _checked_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    config = _conv_config(stride, padding, dilation, groups)
    check_conv_bias_act(x, weight, bias, residual, config)
    _check_prologue(x, in_scale, in_shift)
    reason = size_limit_reason(tuple(x.shape), tuple(weight.shape), config)
    if reason is not None:
        raise ValueError(reason)
    dtypes = supported_dtypes(x.device.type)
    if x.dtype not in dtypes:
        raise TypeError(
            f"the Triton backend runs {', '.join(str(d) for d in dtypes)} on {x.device.type}, got {x.dtype}"
        )
    return conv_bias_act(x, weight, bias, residual, in_scale, in_shift, config, relu)


@torch.library.custom_op("fused_resnet::triton_conv_bias_act", mutates_args=(), device_types="cuda", schema=SCHEMA)
def triton_conv_bias_act(*args: Any, **kwargs: Any) -> torch.Tensor:
    """act(conv(pre(x), weight) + bias + residual) by the Triton kernel; see ops/reference.py for the semantics.
    The arguments are SCHEMA's (spelled out once, on _checked_launch)."""
    return _checked_launch(*args, **kwargs)


@triton_conv_bias_act.register_kernel("cpu")
def _triton_conv_bias_act_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
    if not INTERPRET:
        raise RuntimeError(
            "the Triton backend runs CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or move the tensors to a CUDA device, or use backend='cpu' or 'reference'"
        )
    return _checked_launch(*args, **kwargs)


register_fake_and_autograd(triton_conv_bias_act)
