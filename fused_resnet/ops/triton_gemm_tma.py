"""1×1, stride-1 convs as a plain GEMM whose tiles move by TMA (Hopper's tensor memory accelerator).

In channels_last memory such a conv is y[M, N] = x[M, K] · w[N, K]ᵀ with M = N·H·W pixels, K = Cin, N = Cout,
all three row-major: no im2col, no padding, no per-row pixel arithmetic. These layers are half of ResNet-50's
conv time on an H200 (7.9 of 15.4 ms in the tuner's timings) and mostly bound by memory traffic, which the
pointer-based implicit GEMM drives at about half of the HBM bandwidth. Here each tile is one TMA copy (the copy
engine zero-fills past the edges, so no masks) and the epilogue's residual and output tiles are TMA copies too.

Only a tuned table entry with `tma=True` selects this kernel (the tuner times it against the implicit GEMM on
the GPU at hand); a call it cannot take (misaligned views, fp32) runs the implicit GEMM with the same tiles.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .checks import cuda_capability
from .conv_config import ConvConfig
from .launch_math import cdiv
from .triton_tiles import grouped_tile

if TYPE_CHECKING:
    from .triton_conv_bias_act import KernelConfig

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _gemm_bias_act_kernel(
    x_desc, w_desc, res_desc, y_desc, bias_ptr, M, N, K,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])
        b = w_desc.load([off_n, k * BLOCK_K])
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE).T, acc)

    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += res_desc.load([off_m, off_n]).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, as torch.relu does
    y_desc.store([off_m, off_n], acc.to(OUT_DTYPE))


def is_gemm(kh: int, kw: int, config: ConvConfig) -> bool:
    """Whether a conv of this geometry is a plain GEMM over channels_last memory."""
    return kh == 1 and kw == 1 and config.stride == (1, 1) and config.padding == (0, 0) and config.groups == 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (N, C, H, W) dense channels_last -> its (N·H·W, C) row-major matrix. A view, never a copy (view() raises
    # where reshape() would copy): the output is written through it.
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1])


def has_tma(device: torch.device) -> bool:
    """TMA copies exist from Hopper (sm_90) on; the interpreter (CPU tensors) emulates them."""
    return device.type == "cpu" or cuda_capability(device) >= (9, 0)


def takes(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, config: ConvConfig) -> bool:
    """Whether this call can run here: a GEMM-shaped conv, 16-bit operands, dense channels_last tensors whose
    rows start on 16-byte boundaries (what a TMA copy needs), a GPU with TMA."""
    if x.dtype not in _TL_DTYPES or not is_gemm(weight.shape[2], weight.shape[3], config):
        return False
    if not has_tma(x.device):
        return False
    tensors = [x, weight] if residual is None else [x, weight, residual]
    if any(not t.is_contiguous(memory_format=torch.channels_last) or t.data_ptr() % 16 for t in tensors):
        return False
    # Rows of K and N elements must be whole multiples of 16 bytes.
    return (x.shape[1] * x.element_size()) % 16 == 0 and (weight.shape[0] * x.element_size()) % 16 == 0


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    y: torch.Tensor,
    relu: bool,
    kernel_config: KernelConfig,
    interpret: bool,
) -> None:
    """y = act(x·wᵀ + bias [+ residual]) for operands `takes` accepted; y is dense channels_last."""
    m, k = x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    n = weight.shape[0]
    bm, bn, bk = kernel_config.block_m, kernel_config.block_n, kernel_config.block_k
    x_desc = TensorDescriptor.from_tensor(_rows(x), [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight.view(n, k), [bn, bk])
    y_desc = TensorDescriptor.from_tensor(_rows(y), [bm, bn])
    res_desc = y_desc if residual is None else TensorDescriptor.from_tensor(_rows(residual), [bm, bn])
    dtype = _TL_DTYPES[x.dtype]
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _gemm_bias_act_kernel[grid](
            x_desc, w_desc, res_desc, y_desc, bias, m, n, k,
            HAS_RESIDUAL=residual is not None, RELU=relu,
            # The triton 3.8 interpreter's bf16 tl.dot multiplies raw bits: upcast there, as the conv kernel does.
            DOT_DTYPE=tl.float32 if interpret and dtype == tl.bfloat16 else dtype, OUT_DTYPE=dtype,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=kernel_config.group_m,
            num_warps=kernel_config.num_warps, num_stages=kernel_config.num_stages,
        )  # fmt: skip
