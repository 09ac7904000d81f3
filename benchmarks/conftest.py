"""Fixtures of the pytest-benchmark suite (shared constants and helpers: bench_utils.py).

pytest benchmarks                          # time (GPU: synchronizes inside every timed call)
pytest benchmarks --benchmark-disable -q   # smoke: each benchmark runs once (CI, under 2 minutes on 2 cores)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from bench_utils import ON_GPU, synchronized


@pytest.fixture
def timed(benchmark: Any) -> Callable[..., Any]:
    """timed(fn, **extra_info): records the conditions in benchmark.extra_info, then benchmarks fn."""

    def run(fn: Callable[[], Any], **info: Any) -> Any:
        benchmark.extra_info.update(
            device=torch.cuda.get_device_name() if ON_GPU else "cpu",
            torch=torch.__version__,
            **{k: str(v) for k, v in info.items()},
        )
        with torch.no_grad():
            fn()  # warm-up: cuDNN autotune, Triton compile, folded-weight cache
            return benchmark(synchronized(fn))

    return run


@pytest.fixture(autouse=True)
def _setup() -> None:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
