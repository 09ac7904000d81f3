"""Compiling Triton kernels for an H100 (sm_90) on a machine without a GPU, so that CPU CI catches what only the
compiler rejects (the interpreter never compiles). A stand-in driver answers the few questions a launch asks and
ends the launch when the compiled binary would be loaded; ptxas, bundled with triton, needs no GPU. Each script
runs in its own process, without TRITON_INTERPRET. Miscompiles still need the GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys

PRELUDE = """
import triton
from triton.backends.compiler import GPUTarget


class Compiled(Exception):
    pass


class H100WithoutGPU:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def launcher_cls(self, src, metadata):
        raise Compiled()


triton.runtime.driver.set_active(H100WithoutGPU())


def compiles(launch, label):
    try:
        launch()
    except Compiled:
        print("compiled", label)
"""


def assert_compiles(body: str, expected: int) -> None:
    """Runs PRELUDE + body (which calls compiles(...) `expected` times) and checks that each launch compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == expected, result.stdout + result.stderr[-4000:]
