"""Eager calls without autograd skip the op's dispatch (Backend.launch, nn/functional.py): same result as the op,
and the op path wherever something must see the op (autograd, dispatch modes, the profiler)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fused_resnet import backends
from fused_resnet.nn.functional import conv_bn_act


def _launch_backends() -> list:
    """(backend, device) pairs whose backend has a launch entry: the CPU ones here, the CUDA ones on a GPU."""
    pairs = []
    for name, device in (("triton", "cpu"), ("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda")):
        if device == "cuda":
            marks = [pytest.mark.gpu]
        elif name == "triton" and torch.cuda.is_available():
            continue  # the interpreter is off where there is a GPU
        else:
            marks = []
        if backends.unavailable_reason(name) is not None and not marks:
            continue
        pairs.append(pytest.param((name, device), marks=marks, id=f"{name}-{device}"))
    return pairs


def _layer(device: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=False).to(device).eval()
    bn = nn.BatchNorm2d(16).to(device).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 9, 7, device=device).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 16, 5, 4, device=device).contiguous(memory_format=torch.channels_last)
    return conv, bn, x, residual


class _Spy:
    """Records which of a backend's two entry points ran (and runs it)."""

    def __init__(self, entry: backends.Backend) -> None:
        self.calls: list[str] = []
        self.backend = dataclasses.replace(entry, conv_bias_act=self._wrap("op", entry.conv_bias_act))
        self.backend = dataclasses.replace(self.backend, launch=self._wrap("launch", entry.launch))

    def _wrap(self, tag: str, fn: backends.ConvBiasActFn) -> backends.ConvBiasActFn:
        def called(*args: object) -> torch.Tensor:
            self.calls.append(tag)
            return fn(*args)

        return called


@pytest.fixture(params=_launch_backends())
def spied(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, _Spy]:
    name, device = request.param
    entry = backends.get_backend(name)
    assert entry.launch is not None, f"backend {name!r} lost its launch entry"
    spy = _Spy(entry)
    monkeypatch.setitem(backends._LOADED, name, spy.backend)
    return name, device, spy


class _SeesOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


def test_no_grad_takes_the_launch_and_matches_the_op(spied: tuple[str, str, _Spy]) -> None:
    name, device, spy = spied
    conv, bn, x, residual = _layer(device)
    with torch.no_grad():
        fast = conv_bn_act(x, conv, bn, residual, True, backend=name)
    with torch.inference_mode():
        fast_inference = conv_bn_act(x, conv, bn, residual, True, backend=name)
    assert spy.calls == ["launch", "launch"]
    through_op = conv_bn_act(x, conv, bn, residual, True, backend=name)  # grad mode on: the op, with autograd
    assert spy.calls[-1] == "op"
    assert through_op.requires_grad
    # The same kernel either way: equal to the last bit, in the same layout.
    torch.testing.assert_close(fast, through_op.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fast_inference, fast, rtol=0, atol=0)
    assert fast.is_contiguous(memory_format=torch.channels_last)


def test_dispatch_modes_and_the_profiler_still_see_the_op(spied: tuple[str, str, _Spy]) -> None:
    name, device, spy = spied
    conv, bn, x, residual = _layer(device)
    with torch.no_grad():
        with _SeesOps():
            conv_bn_act(x, conv, bn, residual, True, backend=name)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            conv_bn_act(x, conv, bn, residual, True, backend=name)
    assert spy.calls == ["op", "op"]
    assert any("conv_bias_act" in event.name for event in prof.events())


def test_the_launch_is_not_taken_while_torch_compile_traces(spied: tuple[str, str, _Spy]) -> None:
    name, device, spy = spied
    conv, bn, x, residual = _layer(device)
    compiled = torch.compile(lambda a, r: conv_bn_act(a, conv, bn, r, True, backend=name), backend="aot_eager")
    with torch.no_grad():
        expected = conv_bn_act(x, conv, bn, residual, True, backend=name)
        spy.calls.clear()
        out = compiled(x, residual)
    assert "launch" not in spy.calls
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.trace.* is deprecated:FutureWarning")
def test_a_torchscript_trace_records_the_op(spied: tuple[str, str, _Spy]) -> None:
    # Launched directly, the conv would be missing from the trace, its output frozen in as a constant.
    name, device, spy = spied
    conv, bn, x, residual = _layer(device)
    conv.requires_grad_(False)  # a trace takes parameters as constants only when they need no gradient
    bn.requires_grad_(False)
    with torch.no_grad():
        # (check_trace off: its second run finds the fold cached, a graph that differs only in how W' is made)
        traced = torch.jit.trace(
            lambda a, r: conv_bn_act(a, conv, bn, r, True, backend=name), (x, residual), check_trace=False
        )
        assert "launch" not in spy.calls
        other = torch.randn_like(x)
        torch.testing.assert_close(traced(other, residual), conv_bn_act(other, conv, bn, residual, True, backend=name))
