"""On a GPU: does an input check that fails inside one of the extension's CUDA ops raise a RuntimeError, or crash?

Why: in the 2026-11-27 H100 run (benchmarks/results/2026-11-27_H100_run1) two GPU test workers died of a
segmentation fault at such a refusal: max_pool_nhwc given 12 bf16 channels, bn_grad_sums_coefficients given a
wrong count. Each ran right after its file's opcheck test, while the conv op's float64 refusal passed. The checks
were plain TORCH_CHECKs that raise on CPU. The 2026-11-27 run3 probe crashed in every pool and coefficient case,
even alone, inside std::ostream's integer insertion, while the conv's dtype refusal raised: since then the
extension's checks (FR_CHECK, csrc/message.h) build their messages without std::ostream. Each case below runs in a
fresh process (the refusal alone, after good calls of the op, after each of opcheck's tests alone; two CPU ops'
refusals, one with a number in its message) and is reported as `raised the check` (as it should),
`raised ANOTHER error`, `NO ERROR`, `failed` (before the refusal), `CRASHED` or `TIMED OUT`; the first crash is
rerun under cuda-gdb, where it is on PATH, for the host backtrace.

    python benchmarks/refusal_probe.py            # every case, a line each; exit 1 unless each raised the check
    python benchmarks/refusal_probe.py --case C   # one case in this process
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
WINDOW = ([3, 3], [2, 2], [1, 1])


def _ops():
    import torch

    import fused_resnet.training.cpp_passes  # noqa: F401  (fakes of the training-pass ops)
    import fused_resnet.training.max_pool_train  # noqa: F401  (fakes of the pool ops)

    return torch.ops.fused_resnet_C


def _nhwc(*shape: int, dtype=None):
    import torch

    dtype = dtype or torch.bfloat16
    return torch.randn(*shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)


def _pool_args():
    return (_nhwc(2, 16, 9, 11), *WINDOW, False)


def _coefficient_args(count: float = 24.0):
    import torch

    y = _nhwc(2, 8, 3, 4, dtype=torch.float32)
    scale, shift, mean = (torch.randn(8, device="cuda") for _ in range(3))
    invstd = torch.rand(8, device="cuda") + 0.5
    return (y, y, scale, shift, None, mean, invstd, True, False, count)


def _refuse_pool() -> None:
    _ops().max_pool_nhwc(_nhwc(1, 12, 5, 5), *WINDOW, False)


def _refuse_coefficients() -> None:
    _ops().bn_grad_sums_coefficients(*_coefficient_args(23.0))


def _refuse_conv() -> None:
    import torch

    x = torch.randn(1, 8, 6, 6, device="cuda", dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _ops().conv_bias_act(x, w, torch.zeros(8, device="cuda"), None, None, None, [1, 1], [1, 1], [1, 1], 1, True)


def _refuse_cpu_bias() -> None:
    # A CPU op's refusal, its message holding numbers: whether the crash needs CUDA at all.
    import torch

    _ops().bias_residual_relu(torch.randn(2, 4, 3, 3), torch.zeros(5), None, True)


def _refuse_cpu_dtype() -> None:
    # A CPU op's refusal whose message holds only strings and a dtype (as the conv's, which raised on the H100).
    import torch

    _ops().bias_residual_relu(torch.ones(2, 4, 3, 3, dtype=torch.int32), torch.zeros(4), None, True)


def _good_pool_calls() -> None:
    import torch

    ops = _ops()
    y, *window, ceil_mode = _pool_args()
    scale, shift = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
    ops.max_pool_nhwc(ops.bn_normalize(y, scale, shift, None, True), *window, ceil_mode)
    torch.cuda.synchronize()


def _opcheck(op_name: str, args: Callable[[], tuple], test: str | None) -> Callable[[], None]:
    def run() -> None:
        import torch

        op = getattr(_ops(), op_name).default
        tests = OPCHECK_TESTS if test is None else (test,)
        torch.library.opcheck(op, args(), test_utils=tests)

    return run


# case name -> (what runs first, the refusal)
CASES: dict[str, tuple[Callable[[], None] | None, Callable[[], None]]] = {
    "pool alone": (None, _refuse_pool),
    "pool after good calls": (_good_pool_calls, _refuse_pool),
    "pool after opcheck": (_opcheck("max_pool_nhwc", _pool_args, None), _refuse_pool),
    **{f"pool after {t}": (_opcheck("max_pool_nhwc", _pool_args, t), _refuse_pool) for t in OPCHECK_TESTS},
    "coefficients alone": (None, _refuse_coefficients),
    "coefficients after opcheck": (
        _opcheck("bn_grad_sums_coefficients", _coefficient_args, None),
        _refuse_coefficients,
    ),
    "conv alone": (None, _refuse_conv),
    "conv after the pool's opcheck": (_opcheck("max_pool_nhwc", _pool_args, None), _refuse_conv),
    "cpu op, a number in the message": (None, _refuse_cpu_bias),
    "cpu op, a dtype in the message": (None, _refuse_cpu_dtype),
}


# A piece of the message each refusal's check gives.
_MESSAGES = {
    _refuse_pool: "multiple of 8",
    _refuse_coefficients: "count must be the 24 values",
    _refuse_conv: "float16, bfloat16 and float32",
    _refuse_cpu_bias: "bias must have shape (4,)",
    _refuse_cpu_dtype: "Int",
}


def run_case(name: str) -> None:
    before, refusal = CASES[name]
    if before is not None:
        before()
    expected = _MESSAGES[refusal]
    try:
        refusal()
    except RuntimeError as e:
        first_line = str(e).splitlines()[0][:160]
        print(f"raised {'the check' if expected in str(e) else 'ANOTHER error'}: {first_line}", flush=True)
        return
    print("NO ERROR", flush=True)


def _child(name: str, timeout: float) -> tuple[str, str]:
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--case", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return name, "TIMED OUT"
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode < 0 or any("Fatal Python error" in line for line in lines):
        return name, f"CRASHED (exit {done.returncode}): " + " | ".join(lines[:3])[:300]
    if done.returncode != 0:
        errors = [line for line in lines if "Error" in line] or lines or [""]
        return name, f"failed (exit {done.returncode}): {errors[-1][:300]}"
    return name, lines[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per case (cuda-gdb: 60)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("refusal_probe.py needs a CUDA GPU")
        return 2
    if args.case:
        run_case(args.case)
        return 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda name: _child(name, args.timeout), CASES))
    for name, outcome in results:
        print(f"{name:<45} {outcome}")
    crashed = [name for name, outcome in results if outcome.startswith("CRASHED")]
    if crashed and shutil.which("cuda-gdb"):
        print(f"\ncuda-gdb backtrace of '{crashed[0]}':", flush=True)
        gdb = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, __file__]
        try:
            out = subprocess.run([*gdb, "--case", crashed[0]], capture_output=True, text=True, timeout=60)
            print("\n".join((out.stdout + out.stderr).splitlines()[-60:]))
        except subprocess.TimeoutExpired:
            print("cuda-gdb timed out")
        # The stage after the 2026-11-27 run3 probe died of CUDA out of memory at its first small allocation: whether
        # the debugged process still holds the GPU once cuda-gdb has returned.
        if shutil.which("nvidia-smi"):
            smi = ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"]
            used = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
            print(f"GPU memory used after cuda-gdb returned: {used}")
    return 0 if all(outcome.startswith("raised the check") for _, outcome in results) else 1


if __name__ == "__main__":
    sys.exit(main())
