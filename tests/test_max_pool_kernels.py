"""The stem's training max-pool kernels (csrc/cuda/max_pool.cu) against torch's max-pool: emulated on CPU tensors in
CI (tests/cuda_on_host.py), through the extension's ops on a GPU, and wired into a fused model's training step.

The forward must give torch's values and the backward torch's gradient with respect to the pooled activation,
bit for bit: the argmax rules (first maximum, last NaN) and the fp32 sums in window order are torch's, and the
activation is recomputed with the normalize kernel's own arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.cuda_on_host import host_cuda_passes, max_pool, max_pool_bn_act_backward, pooled_size
from tests.cuda_on_host import unavailable as host_cuda_unavailable

_NO_HOST = pytest.mark.skipif(host_cuda_unavailable() is not None, reason="no CUDA headers for the host emulation")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (kernel, stride, padding): the ResNet stem's, non-overlapping, stride 1, asymmetric, 1x1 windows that skip pixels,
# and 240 taps, near the backward's limit of 254 (a byte names each window's winning tap).
WINDOWS = [
    ((3, 3), (2, 2), (1, 1)),
    ((2, 2), (2, 2), (0, 0)),
    ((3, 3), (1, 1), (1, 1)),
    ((3, 2), (2, 1), (1, 0)),
    ((1, 1), (2, 2), (0, 0)),
    ((15, 16), (4, 4), (7, 8)),
]


def _y(dtype: torch.dtype, shape=(2, 16, 9, 11), nans: bool = True, device: str = "cpu") -> torch.Tensor:
    """A conv output with many equal values (ties in the windows), channels where the values differ but their
    activations round to equal 16-bit values (ties made by the rounding), and a few NaNs; channels_last. No -inf:
    a window of -inf values is where torch's CUDA and CPU max-pools differ (CUDA credits pixel 0, which the kernels
    follow; CPU the first tap)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-3, 4, shape, generator=g).double() / 2
    y[:, 1::3] = torch.rand(y[:, 1::3].shape, generator=g) + 1  # distinct values in [1, 2)
    if nans:
        y.view(-1)[torch.randint(0, y.numel(), (5,), generator=g)] = float("nan")
    return y.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _vectors(channels: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    scale = torch.randn(channels, generator=g)
    scale[::3] = 0.5  # equal scales: equal y give equal activations across the window
    shift = torch.randn(channels, generator=g) * 0.1
    scale[1::3], shift[1::3] = 0.01, 0.5  # activations 0.51-0.52: 16-bit rounding makes ties of distinct values
    return scale.to(device), shift.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so that -0 differs from +0, and NaNs compare by their bits)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    mismatched = (_bits(got) != _bits(want)).sum().item()
    assert mismatched == 0, f"{mismatched} of {got.numel()} values differ in their bits"


def _reference_grad(g: torch.Tensor, act: torch.Tensor, window, ceil_mode: bool) -> torch.Tensor:
    """torch's gradient of max_pool2d(act) (fp32 sums in window order), cast to act's dtype."""
    a = act.float().contiguous()
    _, indices = torch.ops.aten.max_pool2d_with_indices(a, *window, [1, 1], ceil_mode)
    grad = torch.ops.aten.max_pool2d_with_indices_backward(g.float().contiguous(), a, *window, [1, 1], ceil_mode,
                                                           indices)  # fmt: skip
    return grad.to(act.dtype)


@_NO_HOST
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pooled_size_is_torchs(ceil_mode):
    from fused_resnet.training.max_pool_train import pooled_size as python_pooled_size

    for size in range(1, 12):
        for kernel in range(1, 6):
            for stride in range(1, 4):
                for pad in range(0, kernel // 2 + 1):
                    if size + 2 * pad < kernel:
                        continue
                    x = torch.empty(1, 1, size, 1)
                    want = F.max_pool2d(x, (kernel, 1), (stride, 1), (pad, 0), ceil_mode=ceil_mode).shape[2]
                    assert pooled_size(size, kernel, stride, pad, ceil_mode) == want
                    assert python_pooled_size(size, kernel, stride, pad, ceil_mode) == want


@_NO_HOST
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_forward_is_torchs(window, ceil_mode, dtype):
    x = _y(dtype)
    want = F.max_pool2d(x.float().contiguous(), *window, ceil_mode=ceil_mode).to(dtype)
    _assert_bitwise_equal(max_pool(x, *window, ceil_mode).contiguous(), want)


@_NO_HOST
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_emulated_backward_is_torchs(window, ceil_mode, dtype, relu):
    y = _y(dtype)
    scale, shift = _vectors(y.shape[1])
    act = host_cuda_passes().normalize(y, scale, shift, None, relu)  # the arithmetic the backward kernel repeats
    pooled_shape = F.max_pool2d(act.float(), *window, ceil_mode=ceil_mode).shape
    g = torch.randn(pooled_shape).to(dtype).contiguous(memory_format=torch.channels_last)
    got = max_pool_bn_act_backward(g, y, scale, shift, relu, *window)  # g holds no ±0 or NaN: see below
    _assert_bitwise_equal(got.contiguous(), _reference_grad(g, act, window, ceil_mode))


@_NO_HOST
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_backward_copies_a_lone_windows_gradient(dtype):
    # A pixel in one window only gets that window's gradient as it is when it is the argmax (torch's CUDA backward
    # copies it: a -0 or a NaN keeps its bits), else +0; torch's CPU backward would sum from +0 (-0 becomes +0).
    window = ((2, 2), (2, 2), (0, 0))  # every pixel in exactly one window
    y = _y(dtype, shape=(2, 16, 8, 10))
    scale, shift = _vectors(y.shape[1])
    act = host_cuda_passes().normalize(y, scale, shift, None, True).float().contiguous()
    _, indices = torch.ops.aten.max_pool2d_with_indices(act, *window, [1, 1], False)
    g = torch.randn(indices.shape).to(dtype)
    g.view(-1)[::7] = -0.0
    g.view(-1)[3::11] = float("nan")
    want = torch.zeros(act.shape, dtype=dtype)
    _bits(want).flatten(2).scatter_(2, indices.flatten(2), _bits(g).flatten(2))
    got = max_pool_bn_act_backward(g.contiguous(memory_format=torch.channels_last), y, scale, shift, True, *window)
    _assert_bitwise_equal(got.contiguous(), want)


@_NO_HOST
def test_emulated_kernels_refuse_partial_vectors():
    x = _y(torch.bfloat16, shape=(1, 12, 5, 5))  # 12 bf16 channels: one and a half 16-byte vectors
    with pytest.raises(RuntimeError, match="cudaError_t"):
        max_pool(x, *WINDOWS[0], False)


@_NO_HOST
@pytest.mark.parametrize("window", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_backward_credits_pixel_0_where_no_tap_wins(window, dtype):
    # A window of -inf activations has no winner. torch's CUDA max-pool then keeps the argmax it starts from, the
    # image's pixel (0, 0), whose backward takes the gradient of each such window it lies in (copied as it is from
    # one window, else summed in fp32 in the windows' order); every other pixel gets +0. Written out here, since
    # torch's CPU pool credits the window's first tap instead.
    (kh, kw), (sh, sw), (ph, pw) = window
    y = torch.full((2, 16, 7, 6), float("-inf"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.ones(16), torch.zeros(16)
    oh, ow = (pooled_size(size, k, s, p, False) for size, k, s, p in ((7, kh, sh, ph), (6, kw, sw, pw)))
    g = torch.randn(2, 16, oh, ow).to(dtype).contiguous(memory_format=torch.channels_last)
    got = max_pool_bn_act_backward(g, y, scale, shift, False, *window)
    rows = [o for o in range(oh) if o * sh - ph <= 0 < o * sh - ph + kh]
    cols = [o for o in range(ow) if o * sw - pw <= 0 < o * sw - pw + kw]
    want = torch.zeros(y.shape, dtype=dtype)
    if len(rows) * len(cols) == 1:
        want[:, :, 0, 0] = g[:, :, rows[0], cols[0]]
    else:
        total = torch.zeros(2, 16)
        for o in rows:
            for p in cols:
                total += g[:, :, o, p].float()
        want[:, :, 0, 0] = total.to(dtype)
    _assert_bitwise_equal(got.contiguous(), want)


@_NO_HOST
def test_emulated_backward_refuses_a_misaligned_workspace():
    y = _y(torch.bfloat16, shape=(1, 16, 5, 5))
    scale, shift = _vectors(16)
    g = torch.randn(1, 16, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    max_pool_bn_act_backward(g, y, scale, shift, True, *WINDOWS[0])  # aligned: runs
    with pytest.raises(RuntimeError, match="cudaError_t"):  # a byte per channel, 8 bf16 channels read at once
        max_pool_bn_act_backward(g, y, scale, shift, True, *WINDOWS[0], workspace_offset=4)


@_NO_HOST
def test_emulated_backward_refuses_windows_of_255_taps():
    y = _y(torch.bfloat16, shape=(1, 16, 17, 15))
    scale, shift = _vectors(16)
    g = torch.randn(1, 16, 1, 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="cudaError_t"):
        max_pool_bn_act_backward(g, y, scale, shift, True, (17, 15), (8, 8), (0, 0))


# ---------------------------------------------------------------------------------------------------------- on a GPU
def _cuda_ops():
    from fused_resnet.ops import cpp_backend

    reason = cpp_backend.unavailable("cuda")
    if reason is not None:
        pytest.skip(reason)
    import fused_resnet.training.max_pool_train  # noqa: F401  (the ops' fakes)

    return torch.ops.fused_resnet_C


@pytest.mark.gpu
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_are_torchs(window, ceil_mode, dtype):
    ops = _cuda_ops()
    y = _y(dtype, shape=(3, 64, 57, 55), device="cuda")
    scale, shift = _vectors(64, "cuda")
    act = ops.bn_normalize(y, scale, shift, None, True)
    want = F.max_pool2d(act, *window, ceil_mode=ceil_mode)
    _assert_bitwise_equal(ops.max_pool_nhwc(act, *window, ceil_mode), want)
    g = torch.randn(want.shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    flat = g.permute(0, 2, 3, 1).view(-1)  # g's memory in order (a channels_last tensor has no view(-1))
    flat[::7] = -0.0  # torch copies a lone window's gradient, a -0 or a NaN with its bits
    flat[3::101] = float("nan")
    a = act.detach().requires_grad_()
    F.max_pool2d(a, *window, ceil_mode=ceil_mode).backward(g)
    _assert_bitwise_equal(ops.max_pool_bn_act_backward(g, y, scale, shift, True, *window), a.grad)


@pytest.mark.gpu
def test_cuda_ops_opcheck():
    ops = _cuda_ops()
    y = _y(torch.bfloat16, shape=(2, 16, 9, 11), nans=False, device="cuda")
    scale, shift = _vectors(16, "cuda")
    window = list(map(list, WINDOWS[0]))
    torch.library.opcheck(ops.max_pool_nhwc.default, (y, *window, True))
    g = torch.randn(2, 16, 5, 6, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.max_pool_bn_act_backward.default, (g, y, scale, shift, True, *window))


@pytest.mark.gpu
def test_cuda_ops_refuse_bad_input():
    ops = _cuda_ops()
    y = _y(torch.bfloat16, shape=(1, 12, 5, 5), device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.max_pool_nhwc(y, *WINDOWS[0], False)
    y = _y(torch.bfloat16, shape=(1, 16, 5, 5), device="cuda")
    with pytest.raises(RuntimeError, match="at most half the kernel"):
        ops.max_pool_nhwc(y, [2, 2], [2, 2], [2, 2], False)
    scale, shift = _vectors(16, "cuda")
    g = torch.randn(1, 16, 4, 4, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="pooled output's gradient"):
        ops.max_pool_bn_act_backward(g, y, scale, shift, True, *WINDOWS[0])
    y = _y(torch.bfloat16, shape=(1, 16, 17, 15), device="cuda")
    g = torch.randn(1, 16, 1, 1, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 254 taps"):
        ops.max_pool_bn_act_backward(g, y, scale, shift, True, [17, 15], [8, 8], [0, 0])


# --------------------------------------------------------------------------------------- in a fused training step
def _train_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad, model.conv1.weight.grad, model.bn1.weight.grad


def test_fused_training_step_takes_them(emulated_pool_ops_on_cpu, monkeypatch):
    # The same fused step with the stem's pool on the emulated kernels and on torch's (remade input, pooled again):
    # the same results, but for the order of the weight gradient's sums.
    import copy

    import torchvision

    import fused_resnet
    from fused_resnet.training import max_pool_train

    torch.manual_seed(0)
    fused = fused_resnet.fuse(torchvision.models.resnet18(num_classes=10).train(), backend="cpu")
    x = torch.randn(2, 3, 40, 44).contiguous(memory_format=torch.channels_last)
    got = _train_step(copy.deepcopy(fused), x)
    assert emulated_pool_ops_on_cpu == ["forward", "backward"]
    monkeypatch.setattr(max_pool_train, "extension_pools", lambda *args: False)
    want = _train_step(fused, x)
    assert emulated_pool_ops_on_cpu == ["forward", "backward"]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_opcheck_with_the_emulated_kernels(emulated_pool_ops_on_cpu):
    # The fake implementations against the kernels' outputs (shapes, strides, dtypes), and the schemas.
    y = _y(torch.bfloat16, nans=False)
    scale, shift = _vectors(y.shape[1])
    ops = torch.ops.fused_resnet_C
    for window in WINDOWS:
        for ceil_mode in (False, True):
            torch.library.opcheck(ops.max_pool_nhwc.default, (y, *map(list, window), ceil_mode))
            g = F.max_pool2d(y.float(), *window, ceil_mode=ceil_mode).to(y.dtype)
            g = g.contiguous(memory_format=torch.channels_last)
            torch.library.opcheck(ops.max_pool_bn_act_backward.default, (g, y, scale, shift, True, *map(list, window)))
