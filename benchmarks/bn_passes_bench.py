"""Where a fused train step's non-conv time goes: the training passes over every BN layer's conv output of a ResNet,
timed pass by pass beside stock ATen's batch norm on the same tensors, as milliseconds per step and as achieved
memory bandwidth (the bytes a pass must move over its time).

On the H200 (benchmarks/results/2026-11-27_H200_run4) these passes took about 30 of a fused ResNet-50 step's 52 ms
of kernel time, at 1.1 (statistics) to 2.8 (normalize) TB/s of the 4.8 the memory offers; this measures each.

For each BN layer of the model (found by hooks on a stock forward) it times, in the layer's shape, dtype and
channels_last: the statistics (reads y once), the normalize + ReLU (reads y, writes the output), the backward sums
with the ReLU mask (reads g and y) and the input gradient (reads g and y, writes dy); and stock's training-mode
batch norm forward (statistics + normalize) and backward. GPU time alone (the launches hidden), L2 flushed before
each sample, medians of interleaved rounds. Per step = the sum over the model's layers. With the extension's CUDA
kernels in 16 bits it also times normalize, grad_sums and grad_input at 2 and 4 rows per thread ("normalize@2"),
the setting (launch.h: set_bn_rows_per_thread) that trades registers for bytes in flight; and, on CUDA, the stem's
max-pool in training on the extension's kernels beside the ATen calls they replace.

    python benchmarks/bn_passes_bench.py --model resnet50 --batch 256 --bf16
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from fused_resnet.bench.timing import l2_flusher, time_interleaved, warm_up
from fused_resnet.training import passes

# Tensor-sized reads + writes of each contender, in units of one conv output (ATen's forward: its statistics
# kernel reads x, its transform reads x and writes y; its backward: a reduction reads g and x, then g and x are
# read again to write dx).
TENSOR_PASSES = {
    "stats": 1,
    "normalize": 2,
    "grad_sums": 2,
    "grad_input": 3,
    "aten_bn_forward": 3,
    "aten_bn_backward": 5,
}
# The passes whose 16-byte CUDA kernels take a rows-per-thread setting (--rows-per-thread sweeps them).
SWEPT = ("normalize", "grad_sums", "grad_input")


def _tensor_passes(name: str) -> int:
    return TENSOR_PASSES[name.partition("@")[0]]


def bn_input_shapes(model: nn.Module, batch: int, size: int) -> Counter:
    """{(N, C, H, W): how many BN layers see that shape} for one forward of `model` at this batch and size."""
    shapes: Counter = Counter()
    hooks = [
        m.register_forward_pre_hook(lambda _, args: shapes.update([(batch, *args[0].shape[1:])]))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def _at_rows_per_thread(fn: Callable[[], object], rows: int) -> Callable[[], object]:
    """fn with the extension's CUDA training kernels at `rows` rows per thread (launch.h: set_bn_rows_per_thread)."""
    from fused_resnet.ops.cpp_backend import _C

    def run() -> object:
        _C.set_bn_rows_per_thread(rows)
        try:
            return fn()
        finally:
            _C.set_bn_rows_per_thread(1)

    return run


def _contenders(shape: tuple, dtype: torch.dtype, device: torch.device, impl: str, sweep: list[int]) -> dict:
    run = passes.PASSES[impl]
    c = shape[1]

    def tensor() -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    y, g = tensor(), tensor()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift, mean, a, b, cc = (torch.randn(c, device=device, dtype=acc) for _ in range(6))
    # fp32 affine parameters beside 16-bit activations, as under autocast
    weight, bias = torch.ones(c, device=device, dtype=acc), torch.zeros(c, device=device, dtype=acc)
    running_mean, running_var = torch.zeros(c, device=device, dtype=acc), torch.ones(c, device=device, dtype=acc)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        y, weight, bias, running_mean.clone(), running_var.clone(), True, 0.1, 1e-5
    )

    fns = {
        "stats": lambda: run.stats(y),
        "normalize": lambda: run.normalize(y, scale, shift, None, True),
        "grad_sums": lambda: run.grad_sums(g, y, scale, shift, None, mean, True, False),
        "grad_input": lambda: run.grad_input(g, y, scale, shift, None, a, b, cc, True),
        "aten_bn_forward": lambda: torch.ops.aten.native_batch_norm(
            y, weight, bias, running_mean, running_var, True, 0.1, 1e-5
        ),
        "aten_bn_backward": lambda: torch.ops.aten.native_batch_norm_backward(
            g, y, weight, running_mean, running_var, save_mean, save_invstd, True, 1e-5, [True, True, True]
        ),
    }
    for rows in sweep:  # the same passes at other rows per thread: "normalize@2", ...
        fns.update({f"{name}@{rows}": _at_rows_per_thread(fns[name], rows) for name in SWEPT})
    return fns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 tensors (else fp32)")
    parser.add_argument("--passes", default="cpp", choices=sorted(passes.PASSES), help="the implementation timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--rows-per-thread", type=int, nargs="*", default=None, choices=(2, 4),
        help="also time the swept passes at these rows per thread (--passes cpp on CUDA, 16-bit; default: 2 4 there)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    reason = passes.PASSES[args.passes].unsupported(device.type, dtype)
    if reason is not None:
        parser.error(f"--passes {args.passes}: {reason}")
    sweepable = args.passes == "cpp" and device.type == "cuda" and dtype.itemsize == 2
    sweep = (args.rows_per_thread if args.rows_per_thread is not None else [2, 4]) if sweepable else []
    shapes = bn_input_shapes(getattr(torchvision.models, args.model)(), args.batch, args.size)
    print(
        f"{args.model} batch {args.batch} {args.size}x{args.size}, {dtype} channels_last on {device}: "
        f"{sum(shapes.values())} BN layers in {len(shapes)} shapes, passes {args.passes!r}"
    )
    totals_ms: Counter = Counter()
    bytes_per_step: Counter = Counter()
    flush = l2_flusher(device)
    names = list(TENSOR_PASSES) + [f"{name}@{rows}" for rows in sweep for name in SWEPT]
    print(f"  {'shape (N, C, H, W)':24s} {'layers':>6s}  " + "  ".join(f"{k:>16s}" for k in names))
    for shape, count in sorted(shapes.items(), key=lambda item: -item[0][1] * item[0][2] * item[0][3]):
        fns = _contenders(shape, dtype, device, args.passes, sweep)
        for fn in fns.values():
            warm_up(fn, device, 0.0)
        timings = time_interleaved(fns, device, args.rounds, flush=flush, hide_launch=device.type == "cuda")
        tensor_bytes = torch.Size(shape).numel() * dtype.itemsize
        cells = []
        for name in names:
            ms = timings[name].median
            moved = _tensor_passes(name) * tensor_bytes
            totals_ms[name] += ms * count
            bytes_per_step[name] += moved * count
            cells.append(f"{ms:7.3f} ms {moved / ms / 1e6:5.0f}G")
        print(f"  {str(shape):24s} {count:6d}  " + "  ".join(f"{c:>16s}" for c in cells))
    print("  per step (all layers): ms, and GB/s over the bytes each pass must move")
    for name in names:
        ms = totals_ms[name]
        print(f"  {name:18s} {ms:9.3f} ms  {bytes_per_step[name] / ms / 1e6:8.0f} GB/s")
    ours = sum(totals_ms[k] for k in ("stats", "normalize", "grad_sums", "grad_input"))
    stock = totals_ms["aten_bn_forward"] + totals_ms["aten_bn_backward"]
    print(f"  the four passes {ours:.3f} ms vs ATen's batch norm forward + backward {stock:.3f} ms")
    _stem_pool(args, dtype, device, flush)
    return 0


def _stem_pool(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, flush: Callable) -> None:
    """The stem's 3x3/2 max-pool in training (training/max_pool_train.py) on the extension's kernels against what
    they replace: ATen's pool forward, and for backward the remade activation, ATen's pool with indices and its
    backward."""
    shape = (args.batch, 64, (args.size + 1) // 2, (args.size + 1) // 2)  # the stem conv's output
    if args.passes != "cpp" or not _pool_kernels_run(device, dtype):
        print(f"  stem max-pool {shape}: not timed (the extension's kernels run with --passes cpp on CUDA only)")
        return
    try:
        _time_stem_pool(shape, args.rounds, dtype, device, flush)
    except Exception as err:  # a failure is a result: the rows above stand
        print(f"  stem max-pool {shape}: FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")


def _pool_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and passes.PASSES["cpp"].unsupported("cuda", dtype) is None


def _time_stem_pool(shape: tuple, rounds: int, dtype: torch.dtype, device: torch.device, flush: Callable) -> None:
    import torch.nn.functional as F

    from fused_resnet.training.max_pool_train import pooled_size

    ops, window = torch.ops.fused_resnet_C, ([3, 3], [2, 2], [1, 1])
    y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(64, device=device) + 0.5, torch.randn(64, device=device)
    act = ops.bn_normalize(y, scale, shift, None, True)
    side = pooled_size(shape[2], 3, 2, 1, False)
    g = torch.randn(shape[0], 64, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def aten_backward() -> torch.Tensor:
        remade = ops.bn_normalize(y, scale, shift, None, True)
        _, indices = torch.ops.aten.max_pool2d_with_indices(remade, *window, [1, 1], False)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, remade, *window, [1, 1], False, indices)

    fns = {
        "pool_forward": lambda: ops.max_pool_nhwc(act, *window, False),
        "pool_backward": lambda: ops.max_pool_bn_act_backward(g, y, scale, shift, True, *window),
        "aten_pool_forward": lambda: F.max_pool2d(act, *window),
        "aten_pool_backward": aten_backward,
    }
    for fn in fns.values():
        warm_up(fn, device, 0.0)
    timings = time_interleaved(fns, device, rounds, flush=flush, hide_launch=device.type == "cuda")
    full = torch.Size(shape).numel() * dtype.itemsize
    moved = {"pool_forward": full * 5 // 4, "pool_backward": full * 9 // 4}  # the kernels' own reads and writes
    print(f"  stem max-pool {shape}, 3x3/2 (bytes: the extension's kernels' own reads and writes)")
    for name, t in timings.items():
        gbs = moved.get(name.removeprefix("aten_"), 0) / t.median / 1e6
        print(f"  {name:18s} {t.median:9.3f} ms  {gbs:8.0f} GB/s")


if __name__ == "__main__":
    raise SystemExit(main())
