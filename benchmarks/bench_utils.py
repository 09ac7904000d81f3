"""What the benchmark files share: the device, its dtype and sizes, the fused backends worth timing, and
synchronized timing (imported by the benchmark files; pytest fixtures live in conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

# As in tests/conftest.py: without a GPU, Triton kernels can only run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_resnet import backends  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# The GPU times the compute dtype that matters; the CPU (smoke) keeps fp32.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# Fused backends worth timing on this device; Triton on a CPU is only the interpreter.
DEVICE_BACKENDS = ("triton", "cuda", "reference") if ON_GPU else ("cpu", "reference")


def fused_backends() -> list[Any]:
    """pytest params, one per fused backend of the device; unavailable ones are skipped with the reason."""
    params = []
    for name in DEVICE_BACKENDS:
        why = backends.unavailable_reason(name)
        marks = [pytest.mark.skip(reason=f"backend {name!r}: {why}")] if why else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def synchronized(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn followed by a device synchronize, so that pytest-benchmark times the kernels, not their launch."""
    if not ON_GPU:
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
