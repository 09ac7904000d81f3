"""Whether an engine's kernels finish, and right, before a caller relies on them: one call on each, each in a child
process of its own with a time limit. A GPU kernel that never finishes would otherwise stall its caller for good (a
test worker, a benchmark stage), so the kernels of an engine that no GPU has run yet ('cutlass_trial') are asked
first. Where some of the trial's kernels fail and others pass, the trial goes on without the failing ones
(cpp_backend.set_trial_features), so that one broken kernel does not cost the measurements of the rest.

    python -m fused_resnet.ops.engine_smoke cutlass_trial [KERNEL]   # prints "ok", or why not, and exits 0 or 1
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import cpp_backend
from .conv_config import ConvConfig

log = logging.getLogger("fused_resnet")

TIMEOUT_S = 180  # the child imports torch and the extension and initializes CUDA first: seconds on the H100 machine

# (kernel the engine should take it on, x shape, weight shape, stride, padding, with a residual) for each kernel or
# path of the trial: ResNet-50's layer2 3x3 conv (persistent conv), a 1x1 layer with the block's residual (the GEMM's
# wide epilogue) and the RGB stem (channels padded to 8, then the stem tiles' 16-deep K steps), at small batches. The
# trial's kernels are named as its features (cpp_backend.TRIAL_FEATURES).
_CASES = {
    "cutlass_trial": (
        ("persistent-conv", (4, 128, 28, 28), (128, 128, 3, 3), 1, 1, False),
        ("gemm-wide-epilogue", (4, 64, 14, 14), (256, 64, 1, 1), 1, 0, True),
        ("stem-conv", (2, 3, 64, 64), (64, 3, 7, 7), 2, 3, False),
    ),
}
_DROPPED: dict[str, str] = {}


def _run(engine: str, only: str | None = None) -> str | None:
    """In this process: why the engine's kernels (or the one named `only`) failed (None: each took its call and matched
    F.conv2d)."""
    from .. import tolerances

    cpp_backend.set_cuda_engine(engine)
    if only is not None and engine == "cutlass_trial":
        cpp_backend.set_trial_features([only])  # the call then meets that kernel alone
    gen = torch.Generator().manual_seed(0)
    for kernel, x_shape, w_shape, stride, padding, with_residual in _CASES[engine]:
        if only is not None and kernel != only:
            continue
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


def kernel_failures(engine: str) -> dict[str, str]:
    """{kernel: why it failed} over the engine's kernels, each asked in a child process of its own, all at once (so
    that a hang or a crash is its own kernel's, and the wait is one TIMEOUT_S at most). Empty: every one finished
    within TIMEOUT_S and matched F.conv2d; engines without cases are not asked."""
    kernels = [case[0] for case in _CASES.get(engine, ())]
    children = {
        kernel: subprocess.Popen(
            [sys.executable, "-m", "fused_resnet.ops.engine_smoke", engine, kernel],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for kernel in kernels
    }
    deadline = time.monotonic() + TIMEOUT_S
    failed = {}
    for kernel, child in children.items():
        try:
            output, _ = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            failed[kernel] = (
                f"{engine}: the call for its {kernel!r} kernel did not finish within {TIMEOUT_S} s (a hang?)"
            )
            continue
        if child.returncode != 0:
            lines = output.strip().splitlines()
            failed[kernel] = lines[-1] if lines else f"{engine}: the child process exited with {child.returncode}"
    return failed


@functools.cache
def failure(engine: str) -> str | None:
    """Why the engine cannot be trusted on this process's GPU (None: it can). Asked once per process
    (kernel_failures). The trial with some kernels failing and others passing is not refused: it goes on with the
    passing ones alone (cpp_backend.set_trial_features), and dropped(engine) says what was left out and why."""
    failed = kernel_failures(engine)
    if not failed:
        return None
    passing = [case[0] for case in _CASES[engine] if case[0] not in failed]
    if engine == "cutlass_trial" and passing:
        cpp_backend.set_trial_features(passing)
        _DROPPED[engine] = "; ".join(failed.values())
        log.warning("the trial goes on without the kernels that failed: %s", _DROPPED[engine])
        return None
    return "; ".join(failed.values())


def dropped(engine: str) -> str | None:
    """What failure(engine) left out of the engine so that the rest could run, and why (None: nothing)."""
    return _DROPPED.get(engine)


def main() -> int:
    engine, only = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        why = _run(engine, only)
    except Exception as err:  # the child reports any failure as one line
        what = engine if only is None else f"{engine}: its {only!r} kernel"
        why = f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(why or "ok")
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
