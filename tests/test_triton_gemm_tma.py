"""The TMA GEMM for 1×1 stride-1 layers (ops/triton_gemm_tma.py) against the reference: under the Triton
interpreter on CPU, compiled for sm_90 here, compiled and run on a GPU with TMA.

Tolerances as in test_triton_conv_bias_act.py (fp32 accumulation, one rounding of the output): 4u of the dtype.
"""

import pytest
import torch
from sm90_compile import assert_compiles

from fused_resnet.ops import reference, triton_gemm_tma, triton_tune
from fused_resnet.ops import triton_conv_bias_act as tcba
from fused_resnet.ops.conv_config import ConvConfig
from fused_resnet.tolerances import relative_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda" and not tcba.INTERPRET
if DEVICE.type == "cpu" and not tcba.INTERPRET:  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GEMM = ConvConfig()  # 1×1 kernels: stride 1, no padding, one group
gpu = pytest.mark.gpu
needs_tma = pytest.mark.skipif(
    not (ON_GPU and triton_gemm_tma.has_tma(DEVICE)), reason="needs a GPU with TMA (sm_90 or newer)"
)

# On a GPU every test here runs the compiled kernel (edges included), in the GPU check's `pytest -m gpu` too.
pytestmark = [gpu, needs_tma] if DEVICE.type == "cuda" else []


def _operands(n, c, h, w, k, dtype, residual=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        t = (torch.randn(size, generator=gen) * scale).to(DEVICE, dtype)
        return t.contiguous(memory_format=torch.channels_last)

    x = randn(n, c, h, w)
    weight = randn(k, c, 1, 1, scale=c**-0.5)
    bias = torch.randn(k, generator=gen).to(DEVICE)
    res = randn(n, k, h, w) if residual else None
    return x, weight, bias, res


def _check(x, weight, bias, res, relu, kernel_config):
    assert triton_gemm_tma.takes(x, weight, res, GEMM)
    out = tcba.conv_bias_act(x, weight, bias, res, None, None, GEMM, relu, kernel_config)
    f64 = [None if t is None else t.double() for t in (x, weight, bias, res)]
    expected = reference.conv_bias_act(*f64, GEMM, relu)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, expected) <= RTOL[x.dtype]
    return out


# Odd pixel counts (M not a multiple of BLOCK_M), channel counts that are not multiples of the blocks (K = 24 with
# BLOCK_K = 16, N = 40 with BLOCK_N = 16), one K block, no residual: the TMA copies' zero fill and clipping.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "n, c, h, w, k, residual, relu",
    [
        (2, 32, 5, 7, 48, True, True),
        (1, 24, 3, 3, 40, False, True),
        (3, 16, 9, 11, 16, True, False),
        (2, 16, 1, 1, 32, True, True),  # 1×1 images: channels_last strides that size-1 dims leave ambiguous
    ],
)
def test_tma_gemm_matches_the_reference(dtype, n, c, h, w, k, residual, relu):
    x, weight, bias, res = _operands(n, c, h, w, k, dtype, residual)
    _check(x, weight, bias, res, relu, tcba.KernelConfig(32, 16, 16, 4, False, 4, 2, tma=True))


def test_calls_the_tma_copies_cannot_take_run_the_implicit_gemm():
    x, weight, bias, res = _operands(2, 16, 5, 5, 16, torch.bfloat16)
    tma = tcba.KernelConfig(32, 16, 16, 4, False, 4, 2, tma=True)
    expected = tcba.conv_bias_act(x, weight, bias, res, None, None, GEMM, True, tma)
    # A residual view 2 bytes past an aligned start, fp32 operands, a 3×3 or strided layer: refused, and the
    # result is still right (the implicit GEMM with the same tiles).
    shifted = torch.empty(res.numel() + 1, dtype=res.dtype, device=DEVICE)[1:].view(2, 5, 5, 16).permute(0, 3, 1, 2)
    shifted.copy_(res)
    assert not triton_gemm_tma.takes(x, weight, shifted, GEMM)
    out = tcba.conv_bias_act(x, weight, bias, shifted, None, None, GEMM, True, tma)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not triton_gemm_tma.takes(x.float(), weight.float(), None, GEMM)
    assert not triton_gemm_tma.takes(x, weight, None, ConvConfig(stride=(2, 2)))
    assert not triton_gemm_tma.takes(x, weight.expand(16, 16, 3, 3), None, ConvConfig(padding=(1, 1)))


def test_tma_candidates_only_for_16_bit_gemms():
    with_tma = tcba.candidate_configs(256, 1024, 1, 1, torch.bfloat16, tma=True)
    assert sum(c.tma for c in with_tma) == len(tcba.TMA_CANDIDATES)
    assert not any(c.tma for c in tcba.candidate_configs(256, 1024, 1, 1, torch.float32, tma=True))
    assert not any(c.tma for c in tcba.candidate_configs(256, 1024, 1, 1, torch.bfloat16))
    shape = triton_tune.ConvShape(8, 256, 14, 14, 1024, 1, 1)
    assert any(c.tma for c in triton_tune.candidates_of(shape, torch.bfloat16)) == triton_gemm_tma.has_tma(DEVICE)
    assert not any(c.tma for c in triton_tune.candidates_of(shape._replace(stride=2), torch.bfloat16))


_COMPILE_SCRIPT = """
import torch

from fused_resnet.ops import triton_conv_bias_act as tcba, triton_gemm_tma
from fused_resnet.ops.conv_config import ConvConfig

assert not tcba.INTERPRET
for dtype, residual, config in [(torch.bfloat16, True, c) for c in tcba.TMA_CANDIDATES] + [
    (torch.float16, False, tcba.TMA_CANDIDATES[0])
]:
    x = torch.zeros(2, 256, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(512, 256, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
    r = torch.zeros(2, 512, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last) if residual else None
    assert triton_gemm_tma.takes(x, w, r, ConvConfig())
    compiles(lambda: tcba.conv_bias_act(x, w, torch.zeros(512), r, None, None, ConvConfig(), True, config), str(config))
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the tests here compile the kernel for real")
def test_tma_candidates_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    assert_compiles(_COMPILE_SCRIPT, expected=len(tcba.TMA_CANDIDATES) + 1)


# ------------------------------------------------------------------ GPU: ResNet-50 1×1 layers, every candidate

# One K block (Cin 64), a long reduction with a narrow output (1024 -> 256), few pixels and wide outputs (7×7, 2048);
# the tuner checks every candidate on every layer it tunes besides.
GPU_SHAPES = [
    triton_tune.ConvShape(8, 64, 56, 56, 256, 1, 1),
    triton_tune.ConvShape(8, 1024, 14, 14, 256, 1, 1),
    triton_tune.ConvShape(8, 512, 7, 7, 2048, 1, 1),
]


@gpu
@needs_tma
@pytest.mark.parametrize("config", tcba.TMA_CANDIDATES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s.c_in}x{s.h}-o{s.c_out}")
def test_every_tma_candidate_on_resnet50_gemm_layers(shape, config):
    x, weight, bias, res = _operands(shape.batch, shape.c_in, shape.h, shape.w, shape.c_out, torch.bfloat16)
    _check(x, weight, bias, res, True, tcba._clamp(config, shape.c_in, shape.c_out, 1, 64))
