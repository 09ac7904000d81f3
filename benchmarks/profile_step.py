"""Where one step's time goes: host (wall clock per step) against device (kernel time per step), per contender.

A step whose wall time is well above its kernel time is host-bound: the GPU waits for Python to launch work.
For each contender it prints wall ms/step, kernel ms/step (torch.profiler, the sum of every kernel's device
time), kernel launches per step, that time by kind of kernel (told apart by name: convolutions and GEMMs, this
package's own kernels, Triton's, ATen's elementwise and reduction kernels, the rest), and the kernels that take the
most time. A training step is the bench's: forward, cross-entropy, backward, SGD step; cuDNN picks its algorithms
as in the bench (benchmark mode), and each contender's line also gives the median of the bench's own samples (one
step between CUDA events after a synchronize), to compare with the back-to-back wall time, and on a GPU the host's
time to enqueue such a step and the caching allocator's cudaMallocs and out-of-memory retries meanwhile. --compile adds
torch.compile'd stock (default mode), whose step the fused one is measured against. --host-profile N adds, per
contender, where the host's time goes: cProfile over the steps (kernels run asynchronously, so this is the host's
own time), the N Python files and the N functions with the most time of their own per step, and the time spent
inside PyTorch's compiled functions and ops ("built-ins").

    python benchmarks/profile_step.py --device cuda --bf16 --model resnet50 --batch 256 --mode train --compile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fused_resnet
from fused_resnet.bench.contenders import engine_scope, engine_unfit, hopper_engine_runs, other_cuda_engines
from fused_resnet.bench.timing import time_interleaved


def _contenders(
    model: nn.Module, device: torch.device, backends: list[str], compiled: bool = False
) -> dict[str, tuple[nn.Module, str | None]]:
    """{name: (network, the cuda backend's engine or None)}; a backend may be named "cuda+cutlass" (that engine)."""
    stock = model.to(device, memory_format=torch.channels_last)
    out: dict[str, tuple[nn.Module, str | None]] = {"stock_cl": (stock, None)}
    if compiled:
        out["compile"] = (torch.compile(stock), None)
    for name in backends:
        backend, _, engine = name.partition("+")
        out[f"fused:{name}"] = (fused_resnet.fuse(stock, backend=backend), engine or None)
    return out


def _step(net: nn.Module, x: torch.Tensor, train: bool, bf16: bool, engine: str | None) -> Callable[[], None]:
    """One forward, or one training step as the bench times it (fused_resnet/bench/contenders.py: cross-entropy
    on random labels, backward, an SGD step with momentum), so that wall times compare with the bench's."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9) if train else None
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run() -> None:
        with (
            torch.autocast(x.device.type, torch.bfloat16, enabled=bf16),
            torch.set_grad_enabled(train),
            engine_scope(engine),
        ):
            out = net(x)
            loss = F.cross_entropy(out.float(), target) if optimizer is not None else None
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_us(event: object) -> float:
    # torch >= 2.4 names it device time; older releases cuda time.
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


# Kinds of kernels, by name: the first kind with a pattern that a kernel's name contains decides. Inductor's
# pointwise and reduction kernels come first, since their names carry the ops they fused ("..._convolution_...").
KERNEL_KINDS = (
    ("inductor", ("triton_poi", "triton_per", "triton_red")),
    ("conv/gemm", ("conv", "cudnn", "xmma", "gemm", "cutlass", "wgrad", "dgrad", "fprop", "sm90_", "triton_tem")),
    ("fused_resnet", ("fused_resnet",)),
    ("aten", ("at::native",)),
)


def kernel_kind(name: str) -> str:
    """The kind (KERNEL_KINDS) of a kernel by its name; "other" where no pattern matches."""
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p.lower() in lowered for p in patterns):
            return kind
    return "other"


def measure(step: Callable[[], None], device: torch.device, steps: int) -> dict:
    """Wall ms per step, kernel ms per step, launches per step and the top kernels of `steps` profiled steps."""
    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    # The bench's own sample (fused_resnet/bench/timing.py): one step between CUDA events after a synchronize, so
    # the host's time to reach the step's first kernel counts, where back-to-back steps above overlap it.
    # Beside it, the host's time to enqueue that step and what the caching allocator did meanwhile.
    samples = time_interleaved({"step": step}, device, rounds=steps)["step"]
    sample_ms = samples.median
    host = statistics.median(samples.host_ms) if samples.host_ms else None
    allocator = (samples.cuda_mallocs, samples.alloc_retries)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()
    if device.type != "cuda":  # no kernels: the ops that take the most CPU time themselves
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        rows = [(e.key[:70], e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in top]
        return {
            "wall_ms": wall_ms,
            "sample_ms": sample_ms,
            "host_ms": host,
            "allocator": allocator,
            "kernel_ms": None,
            "launches": None,
            "kinds": {},
            "top": rows,
        }
    kernels = [e for e in events if _device_us(e) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(kernels, key=_device_us, reverse=True)[:8]
    kinds: dict[str, list[float]] = {}
    for e in kernels:
        ms_count = kinds.setdefault(kernel_kind(e.key), [0.0, 0.0])
        ms_count[0] += _device_us(e) / 1e3 / steps
        ms_count[1] += e.count / steps
    return {
        "wall_ms": wall_ms,
        "sample_ms": sample_ms,
        "host_ms": host,
        "allocator": allocator,
        "kernel_ms": sum(_device_us(e) for e in kernels) / 1e3 / steps,
        "launches": sum(e.count for e in kernels) / steps,
        "kinds": kinds,
        "top": [(e.key[:70], _device_us(e) / 1e3 / steps, e.count // steps) for e in top],
    }


_REPO = str(Path(__file__).resolve().parents[1]) + "/"


def host_profile(step: Callable[[], None], device: torch.device, steps: int) -> tuple[list, list]:
    """(files, functions): [(ms per step, calls per step, name)] of the host's time in `steps` steps, by Python file
    and by function, each sorted by time of its own; compiled functions and ops are one entry, "built-ins"."""
    step()
    _sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    _sync(device)
    files: dict[str, list[float]] = {}
    functions = []
    for (path, line, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = "built-ins" if path == "~" else path.split("site-packages/")[-1].removeprefix(_REPO)
        entry = files.setdefault(where, [0.0, 0.0])
        entry[0] += own * 1e3 / steps
        entry[1] += calls / steps
        if path != "~":
            functions.append((own * 1e3 / steps, calls / steps, f"{where}:{line}({name})"))
    by_file = sorted(((ms, n, where) for where, (ms, n) in files.items()), reverse=True)
    return by_file, sorted(functions, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16: autocast in train mode, bf16 weights in inference")
    parser.add_argument("--mode", choices=("inference", "train"), default="train")
    parser.add_argument(
        "--backends", nargs="+", default=None,
        help="fused backends; cuda+<engine> (mma, cutlass, cutlass_next, cutlass_trial) pins the cuda backend's engine "
        "(default: those of the device)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd stock (default mode)")
    parser.add_argument(
        "--host-profile", type=int, default=0, metavar="N",
        help="also the host's time per step by Python file and function (cProfile), the N largest of each",
    )  # fmt: skip
    args = parser.parse_args(argv)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as the bench runs (fused_resnet/bench/cli.py): the same cuDNN algorithms
    try:
        return _profile(args)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _profile(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    train = args.mode == "train"
    backends = args.backends or (["triton", "cuda"] if device.type == "cuda" else ["cpu"])
    if args.backends is None and not train and args.bf16 and hopper_engine_runs(device):
        # the cuda backend's other engines beside the one in use (by default the Hopper one)
        for engine in other_cuda_engines():
            why = engine_unfit(engine)
            if why:
                print(f"  leaving out cuda+{engine}: {why}")
            else:
                backends.append(f"cuda+{engine}")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=1000).train(train)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    autocast = args.bf16 and train
    if args.bf16 and not train:
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    print(
        f"{args.model} {args.mode} batch {args.batch} {args.size}x{args.size} on {device}"
        f"{' bf16' if args.bf16 else ''}: per step, {args.steps} steps"
    )
    for name, (net, engine) in _contenders(model, device, backends, args.compile).items():
        try:
            r = measure(_step(net.train(train), x, train, autocast, engine), device, args.steps)
        except Exception as err:  # one failing contender is reported, the others still run
            print(f"  {name:14s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        kernel = "" if r["kernel_ms"] is None else f"  kernels {r['kernel_ms']:8.2f} ms in {r['launches']:.0f} launches"
        print(f"  {name:14s} wall {r['wall_ms']:8.2f} ms  bench-style {r['sample_ms']:8.2f} ms{kernel}")
        if r["host_ms"] is not None:
            mallocs, retries = r["allocator"]
            print(
                f"      host enqueues a bench-style step in {r['host_ms']:.2f} ms; while timed: {mallocs} cudaMalloc, "
                f"{retries} allocator retries"
            )
        for kind, (ms, count) in sorted(r["kinds"].items(), key=lambda item: -item[1][0]):
            print(f"      {ms:7.3f} ms  x{count:<4.0f} [{kind}]")
        for key, ms, count in r["top"]:
            print(f"      {ms:7.3f} ms  x{count:<4d} {key}")
        if args.host_profile:
            step = _step(net, x, train, autocast, engine)
            by_file, by_function = host_profile(step, device, args.steps)
            total = sum(ms for ms, _, _ in by_file)
            print(f"      host, under cProfile: {total:.1f} ms a step; by file, then by function (own time):")
            for ms, calls, where in by_file[: args.host_profile] + by_function[: args.host_profile]:
                print(f"      {ms:7.2f} ms  x{calls:<6.0f} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
