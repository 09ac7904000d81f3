"""Tunes the Triton conv kernel per layer shape on this GPU and writes the table normal runs look up.

    python -m fused_resnet.ops.triton_tune --models resnet50 resnext50_32x4d --batch 32 --dtypes bf16 fp16 tf32

Every candidate config is checked against the reference before it is timed, not only the winner: Triton convs
have miscompiled silently with num_warps=8 (PyTorch issue #173068). A config that fails is reported and never
written to the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import multiprocessing.pool
import os
import sys
from typing import NamedTuple

import torch
import triton

from ..tolerances import forward_rtol, relative_error
from . import reference, triton_gemm_tma
from . import triton_conv_bias_act as kernels
from .conv_config import ConvConfig

# name: (block, blocks per stage, groups, width per group), as torchvision builds them.
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}

_SHAPES_PER_ROUND = 4

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}


class ConvShape(NamedTuple):
    """One conv layer at one batch size: input (N, C, H, W), filter (Cout, KH, KW) and its ConvConfig."""

    batch: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def config(self) -> ConvConfig:
        return ConvConfig((self.stride,) * 2, (self.padding,) * 2, (self.dilation,) * 2, self.groups)


def resnet_conv_shapes(model: str, batch: int, image_size: int = 224) -> list[ConvShape]:
    """The distinct conv shapes of a torchvision ResNet/ResNeXt/Wide ResNet, in network order."""
    block, layers, groups, width_per_group = ARCHITECTURES[model]
    shapes = [ConvShape(batch, 3, image_size, image_size, 64, 7, 7, stride=2, padding=3)]
    size = (image_size - 1) // 2 + 1  # the 7×7/2 stem
    size = (size - 1) // 2 + 1  # the 3×3/2 max pool
    in_planes = 64
    for stage, blocks in enumerate(layers):
        planes = 64 << stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            out_size = (size - 1) // stride + 1
            if block == "basic":
                out_planes = planes
                shapes += [
                    ConvShape(batch, in_planes, size, size, planes, 3, 3, stride, 1),
                    ConvShape(batch, planes, out_size, out_size, planes, 3, 3, 1, 1),
                ]
            else:
                width = planes * width_per_group // 64 * groups
                out_planes = planes * 4
                shapes += [
                    ConvShape(batch, in_planes, size, size, width, 1, 1),
                    # torchvision (ResNet v1.5) puts the stride on the 3×3, not on the first 1×1.
                    ConvShape(batch, width, size, size, width, 3, 3, stride, 1, groups=groups),
                    ConvShape(batch, width, out_size, out_size, out_planes, 1, 1),
                ]
            if stride != 1 or in_planes != out_planes:
                shapes.append(ConvShape(batch, in_planes, size, size, out_planes, 1, 1, stride))
            in_planes, size = out_planes, out_size
    return list(dict.fromkeys(shapes))


def make_inputs(shape: ConvShape, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> dict:
    """Random operands for one layer (with a residual), scaled so that outputs stay O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c_in_g = shape.c_in // shape.groups
    fan_in = c_in_g * shape.kh * shape.kw
    oh, ow = shape.config.output_hw(shape.h, shape.w, shape.kh, shape.kw)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    return {
        "x": randn(shape.batch, shape.c_in, shape.h, shape.w).contiguous(memory_format=torch.channels_last),
        "weight": randn(shape.c_out, c_in_g, shape.kh, shape.kw, scale=fan_in**-0.5).contiguous(
            memory_format=torch.channels_last
        ),
        "bias": torch.randn(shape.c_out, generator=gen, device=device),
        "residual": randn(shape.batch, shape.c_out, oh, ow).contiguous(memory_format=torch.channels_last),
    }


def run(shape: ConvShape, inputs: dict, kernel_config: kernels.KernelConfig) -> torch.Tensor:
    return kernels.conv_bias_act(
        inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], None, None, shape.config, True, kernel_config
    )


def check_config(shape: ConvShape, inputs: dict, kernel_config: kernels.KernelConfig) -> float:
    """Relative error of one config against the fp32 reference computed from the same rounded inputs."""
    out = run(shape, inputs, kernel_config)
    fp32 = {name: t.float() for name, t in inputs.items()}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        expected = reference.conv_bias_act(
            fp32["x"], fp32["weight"], fp32["bias"], fp32["residual"], shape.config, True
        )
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return relative_error(out, expected)


def candidates_of(shape: ConvShape, dtype: torch.dtype) -> list[kernels.KernelConfig]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tma = triton_gemm_tma.is_gemm(shape.kh, shape.kw, shape.config) and triton_gemm_tma.has_tma(device)
    c_in_g, c_out_g = shape.c_in // shape.groups, shape.c_out // shape.groups
    return kernels.candidate_configs(c_in_g, c_out_g, shape.kh, shape.kw, dtype, tma=tma)


@functools.lru_cache(maxsize=1)
def _cached_inputs(shape: ConvShape, tag: str) -> dict:
    cuda = torch.cuda.is_available()  # (the CPU under the Triton interpreter: tests)
    return make_inputs(shape, _DTYPES[tag], torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")


def _why_failed(err: Exception) -> str:
    if isinstance(err, triton.runtime.errors.OutOfResources):
        return f"does not fit ({err})"
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    return f"failed ({type(err).__name__}: {first_line})"


def check_job(job: tuple[ConvShape, str, kernels.KernelConfig]) -> float | str:
    """One candidate's relative error, or why it cannot run (run in a worker process: this compiles it)."""
    shape, tag, config = job
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tag == "tf32"
    try:
        return check_config(shape, _cached_inputs(shape, tag), config)
    except Exception as err:  # a candidate that cannot compile or launch here is reported, not the end of the run
        return _why_failed(err)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def check_all(
    jobs: list[tuple[ConvShape, str, kernels.KernelConfig]], pool: multiprocessing.pool.Pool | None = None
) -> dict[tuple[ConvShape, str, kernels.KernelConfig], float | str]:
    """Every job's check, in the pool's processes side by side when there is one (compiling is most of a tuning
    run's time, and one process compiles on one core); Triton's disk cache then hands the kernels to the timing
    process."""
    if pool is None:
        return {job: check_job(job) for job in jobs}
    # Neighbouring jobs share a shape, so chunks of them reuse one worker's inputs.
    return dict(zip(jobs, pool.map(check_job, jobs, chunksize=4), strict=True))


def checking_pool(workers: int) -> contextlib.AbstractContextManager[multiprocessing.pool.Pool | None]:
    """A pool of `workers` processes for check_all (None for one: check in this process)."""
    if workers <= 1:
        return contextlib.nullcontext()
    # spawn: a forked child cannot use CUDA once the parent has.
    return multiprocessing.get_context("spawn").Pool(workers)


def tune_shape(
    shape: ConvShape,
    dtype: torch.dtype,
    device: torch.device,
    checks: dict[kernels.KernelConfig, float | str] | None = None,
) -> tuple[kernels.KernelConfig | None, list[str]]:
    """The fastest config that passes the check, and one report line per candidate. `checks` holds the
    candidates' checks when they were made already (check_all); otherwise each is checked here first."""
    inputs = make_inputs(shape, dtype, device)
    tolerance = forward_rtol(dtype, device)
    best, best_ms, lines = None, float("inf"), []
    for config in candidates_of(shape, dtype):
        if checks is not None:
            error = checks[config]
        else:
            try:
                error = check_config(shape, inputs, config)
            except Exception as err:  # as in check_job
                error = _why_failed(err)
        if isinstance(error, str):
            lines.append(f"  {config}: {error}")
            continue
        if not error <= tolerance:  # also catches NaN
            lines.append(f"  {config}: WRONG, relative error {error:.3g} > {tolerance:.3g}")
            continue
        ms = triton.testing.do_bench(
            lambda config=config: run(shape, inputs, config), warmup=10, rep=40, return_mode="median"
        )
        lines.append(f"  {config}: {ms:.4f} ms, relative error {error:.2g}")
        if ms < best_ms:
            best, best_ms = config, ms
    return best, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = sorted(ARCHITECTURES)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnext50_32x4d"], choices=models)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "tf32"], choices=sorted(_DTYPES))
    parser.add_argument("--out", default=str(kernels.TUNED_CONFIGS_PATH), help="table to update (default: %(default)s)")
    parser.add_argument(
        "--compile-workers",
        type=int,
        default=min(12, os.cpu_count() or 1),
        help="processes that compile and check the candidates side by side before the timing (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or kernels.INTERPRET:
        print("tuning needs a CUDA GPU and TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    with open(args.out) as f:
        table = json.load(f)
    entries = table.setdefault(gpu, {})
    shapes = list(
        dict.fromkeys(
            shape
            for model in args.models
            for batch in args.batch
            for shape in resnet_conv_shapes(model, batch, args.image_size)
        )
    )
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        with checking_pool(args.compile_workers) as pool:
            for tag in args.dtypes:
                dtype = _DTYPES[tag]
                # A few shapes at a time, checked side by side and then timed alone (no checks running on the GPU
                # meanwhile), each written when timed: a run stopped early keeps what it finished.
                for first in range(0, len(shapes), _SHAPES_PER_ROUND):
                    chunk = shapes[first : first + _SHAPES_PER_ROUND]
                    checks = check_all([(s, tag, c) for s in chunk for c in candidates_of(s, dtype)], pool)
                    torch.backends.cudnn.allow_tf32 = tag == "tf32"
                    for shape in chunk:
                        x_shape = (shape.batch, shape.c_in, shape.h, shape.w)
                        w_shape = (shape.c_out, shape.c_in // shape.groups, shape.kh, shape.kw)
                        key = kernels.shape_key(x_shape, w_shape, shape.config, dtype, "cuda")
                        shape_checks = {c: checks[(shape, tag, c)] for c in candidates_of(shape, dtype)}
                        best, lines = tune_shape(shape, dtype, device, shape_checks)
                        print(f"{key}: {best}", *lines, sep="\n", flush=True)
                        if best is not None:
                            entries[key] = dataclasses.asdict(best)
                        with open(args.out, "w") as f:
                            json.dump(table, f, indent=1, sort_keys=True)
                            f.write("\n")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    print(f"wrote {len(entries)} entries for {gpu!r} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
