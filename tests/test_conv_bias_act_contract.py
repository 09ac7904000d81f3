"""The contract every backend op shares: the reference semantics, and the shared fake + backward formulas,
checked here on a test op that wraps the reference (so they are verified independently of any kernel)."""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet.ops import reference
from fused_resnet.ops.conv_bias_act_autograd import SCHEMA, register_fake_and_autograd
from fused_resnet.ops.conv_config import ConvConfig


@torch.library.custom_op("fused_resnet_test::conv_bias_act", mutates_args=(), schema=SCHEMA)
def _test_op(*args: object) -> torch.Tensor:
    x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, groups, relu = args
    config = ConvConfig(tuple(stride), tuple(padding), tuple(dilation), groups)
    y = reference.conv_bias_act(x, weight, bias, residual, config, relu, in_scale, in_shift)
    return y.contiguous(memory_format=torch.channels_last)


register_fake_and_autograd(_test_op)

CONFIGS = {
    "3x3": (8, 8, 3, ConvConfig(padding=(1, 1))),
    "3x3s2": (8, 8, 3, ConvConfig(stride=(2, 2), padding=(1, 1))),
    "1x1s2": (8, 16, 1, ConvConfig(stride=(2, 2))),
    "grouped": (8, 8, 3, ConvConfig(padding=(1, 1), groups=4)),
    "dilated": (4, 8, 3, ConvConfig(padding=(2, 2), dilation=(2, 2))),
    "stem": (3, 8, 7, ConvConfig(stride=(2, 2), padding=(3, 3))),
}


def _args(name, residual, prologue, dtype=torch.float64):
    cin, cout, k, cfg = CONFIGS[name]
    x = torch.randn(2, cin, 7, 9, dtype=dtype)
    w = torch.randn(cout, cin // cfg.groups, k, k, dtype=dtype)
    b = torch.randn(cout, dtype=dtype)
    oh, ow = cfg.output_hw(7, 9, k, k)
    r = torch.randn(2, cout, oh, ow, dtype=dtype) if residual else None
    s = torch.rand(cin, dtype=dtype) + 0.5 if prologue else None
    t = torch.randn(cin, dtype=dtype) if prologue else None
    return (x, w, b, r, s, t, list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups, True)


def test_reference_semantics_by_hand():
    x, w, b = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)
    s, t = torch.rand(2) + 0.5, torch.randn(2)
    r = torch.randn(1, 3, 4, 4)
    got = reference.conv_bias_act(x, w, b, r, ConvConfig(padding=(1, 1)), True, s, t)
    # Pre-activation first, zero padding after it: padded pixels are 0, not relu(0 * s + t).
    a = F.pad(torch.relu(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)), (1, 1, 1, 1))
    want = torch.relu(F.conv2d(a, w) + b.view(1, -1, 1, 1) + r)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("residual,prologue", [(False, False), (True, False), (True, True)])
def test_shared_backward_gradcheck(name, residual, prologue):
    args = _args(name, residual, prologue)
    inputs = [a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: _test_op(*a), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["3x3s2", "grouped"])
def test_opcheck_fake_and_autograd_registration(name):
    args = _args(name, True, True)
    torch.library.opcheck(_test_op, args)


def test_fake_output_is_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _args("3x3s2", True, False, torch.float32)
        out = _test_op(*args)
    assert out.shape == (2, 8, 4, 5) and out.is_contiguous(memory_format=torch.channels_last)
