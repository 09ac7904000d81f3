"""Whether an engine's kernels finish, and right, before a caller relies on them: one call on each, in a child process
with a time limit. A GPU kernel that never finishes would otherwise stall its caller for good (a test worker, a
benchmark stage), so the kernels of an engine that no GPU has run yet ('cutlass_trial') are asked first.

    python -m fused_resnet.ops.engine_smoke cutlass_trial      # prints "ok", or why not, and exits 0 or 1
"""

from __future__ import annotations

import functools
import subprocess
import sys

import torch
import torch.nn.functional as F

from . import cpp_backend
from .conv_config import ConvConfig

TIMEOUT_S = 180  # the child imports torch and the extension and initializes CUDA first: seconds on the H100 machine

# (kernel the engine should take it on, x shape, weight shape, stride, padding, with a residual) for each kernel or
# path of the trial: ResNet-50's layer2 3x3 conv (persistent conv), a 1x1 layer with the block's residual (the GEMM's
# wide epilogue) and the RGB stem (channels padded to 8, then the stem tiles' 16-deep K steps), at small batches.
_CASES = {
    "cutlass_trial": (
        ("persistent-conv", (4, 128, 28, 28), (128, 128, 3, 3), 1, 1, False),
        ("gemm-wide-epilogue", (4, 64, 14, 14), (256, 64, 1, 1), 1, 0, True),
        ("stem-conv", (2, 3, 64, 64), (64, 3, 7, 7), 2, 3, False),
    ),
}


def _run(engine: str) -> str | None:
    """In this process: why the engine's kernels failed (None: each took its call and matched F.conv2d)."""
    from .. import tolerances

    cpp_backend.set_cuda_engine(engine)
    gen = torch.Generator().manual_seed(0)
    for kernel, x_shape, w_shape, stride, padding, with_residual in _CASES[engine]:
        x = torch.randn(x_shape, generator=gen)
        w = torch.randn(w_shape, generator=gen) * (2.0 / (w_shape[1] * w_shape[2] * w_shape[3])) ** 0.5
        b = torch.randn(w_shape[0], generator=gen) * 0.1
        config = ConvConfig((stride, stride), (padding, padding), (1, 1), 1)
        r = torch.randn(config.output_shape(x, w), generator=gen) if with_residual else None

        def on_gpu(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)

        before = cpp_backend._C.sm90_engine_launches(kernel)
        out = cpp_backend.conv_bias_act(on_gpu(x), on_gpu(w), b.cuda(), on_gpu(r), config, True)
        torch.cuda.synchronize()
        if cpp_backend._C.sm90_engine_launches(kernel) == before:
            return f"{engine}: the call for its {kernel!r} kernel ran on another kernel"
        expected = F.conv2d(on_gpu(x).float(), on_gpu(w).float(), b.cuda(), stride=stride, padding=padding)
        expected = torch.relu(expected + (0 if r is None else on_gpu(r).float()))
        err = tolerances.relative_error(out, expected)
        tol = tolerances.forward_rtol(torch.bfloat16, "cuda")
        if not err <= tol:
            return f"{engine}: its {kernel!r} kernel is off by {err:.2e} relative (tolerance {tol})"
    return None


@functools.cache
def failure(engine: str) -> str | None:
    """Why the engine's kernels cannot be trusted on this process's GPU (None: one call on each finished in a child
    process within TIMEOUT_S and matched F.conv2d). Engines without cases are not asked."""
    if engine not in _CASES:
        return None
    cmd = [sys.executable, "-m", "fused_resnet.ops.engine_smoke", engine]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{engine}: one call on each of its kernels did not finish within {TIMEOUT_S} s (a hang?)"
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()
        return lines[-1] if lines else f"{engine}: the child process exited with {result.returncode}"
    return None


def main() -> int:
    engine = sys.argv[1]
    try:
        why = _run(engine)
    except Exception as err:  # the child reports any failure as one line
        why = f"{engine}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(why or "ok")
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
