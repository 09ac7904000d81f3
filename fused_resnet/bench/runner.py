"""Runs the model-level groups of a profile: build every contender, check its parity, warm it up, time all of them
interleaved, and turn the measurements into rows."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from torch import nn

from ..tolerances import max_abs_error, relative_error
from . import contenders as cont
from . import parity, roofline
from .profiles import Group, Profile, dtype_name
from .progress import Progress
from .timing import Timing, time_interleaved, warm_up

SEED = 0
OUT_OF_TIME = "time budget (--max-minutes) exhausted before it started; --resume runs it"


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception, prefixed with its type, at most 300 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 convs and matmuls without TF32, for references."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_model(name: str, image_size: int, device: torch.device) -> nn.Module:
    """A torchvision model with seeded random weights and BN running statistics calibrated on random images
    (so that eval-mode activations stay normalized and BN folding is not a no-op), in eval mode."""
    torch.manual_seed(SEED)
    builder = getattr(torchvision.models, name, None)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; use a torchvision.models builder name such as 'resnet50'")
    model = builder(weights=None).to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, image_size, image_size, device=device))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def inputs(batch: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + batch)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return x, target


def reference_logits(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """fp32 eager NCHW logits (TF32 off) of the same input; in train mode with batch statistics."""
    net = copy.deepcopy(model).float().train(train)
    with torch.no_grad(), strict_fp32():
        return net(x.float()).double()


@functools.cache
def layers_of(model_name: str, batch: int, image_size: int) -> tuple[roofline.Layer, ...]:
    model = getattr(torchvision.models, model_name)(weights=None)
    return tuple(roofline.model_layers(model, (batch, 3, image_size, image_size)))


@functools.cache
def _flops(model_name: str, batch: int, image_size: int, train: bool) -> int:
    model = getattr(torchvision.models, model_name)(weights=None)
    return roofline.model_flops(model, (batch, 3, image_size, image_size), train)


def ceilings(
    model_name: str, batch: int, image_size: int, dtype: torch.dtype, device_type: str, peaks: roofline.DevicePeaks
) -> dict[str, float]:
    return roofline.ceilings(list(layers_of(model_name, batch, image_size)), batch, peaks, dtype, device_type)


def roofline_entry(group: Group, profile: Profile, device: torch.device, peaks: roofline.DevicePeaks) -> dict:
    c = ceilings(group.model, group.batch, profile.image_size, group.dtype, device.type, peaks)
    return {
        "model": group.model,
        "batch": group.batch,
        "dtype": dtype_name(group.dtype),
        "peaks": f"{peaks.name} ({peaks.source})",
        **c,
    }


def timing_fields(t: Timing, batch: int) -> dict[str, Any]:
    fields = {
        "images_per_s": batch / (t.median * 1e-3),
        "ms_p50": t.median,
        "ms_p20": t.quantile(0.2),
        "ms_p80": t.quantile(0.8),
        "ms_p90": t.quantile(0.9),
        "samples": len(t.samples_ms),
    }
    if t.host_ms:  # GPU samples: what the host and the allocator did meanwhile
        host_ms = statistics.median(t.host_ms)
        fields.update(host_ms_p50=host_ms, cuda_mallocs=t.cuda_mallocs, alloc_retries=t.alloc_retries)
    return fields


def inner_calls(best_ms: float, batch: int, device: torch.device) -> int:
    """Calls per timed sample: 1 at batch 1 (latency) and on CPU; on GPU enough for ~20 ms per sample."""
    if batch == 1 or device.type != "cuda":
        return 1
    return max(1, round(20.0 / max(best_ms, 1e-3)))


def rounds_for(profile: Profile, per_round_ms: float, budget_s: float) -> int:
    """As many rounds as fit the time budget, within the profile's bounds."""
    rounds = int(budget_s * 1e3 / max(per_round_ms, 1e-3))
    return max(profile.min_rounds, min(profile.max_rounds, rounds))


def _reset_compiler() -> None:
    torch._dynamo.reset()
    # A model instance per contender means a recompile per instance; past the limit dynamo would silently run
    # eager code under a "compile" name.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def run_group(
    group: Group,
    profile: Profile,
    device: torch.device,
    peaks: roofline.DevicePeaks | None,
    base: Callable[[dict[str, Any]], dict[str, Any]],
    progress: Progress,
    deadline: float = float("inf"),
) -> list[dict[str, Any]]:
    """Rows for every contender of one (model, batch, dtype, mode) group; contenders not started by the
    deadline are skipped with OUT_OF_TIME."""
    _reset_compiler()
    train = group.mode == "train"
    model = make_model(group.model, profile.image_size, device)
    x, target = inputs(group.batch, profile.image_size, device)
    reference = reference_logits(model, x, train)
    gflop = _flops(group.model, group.batch, profile.image_size, train) / 1e9

    def ceiling_ms(dtype: torch.dtype) -> float | None:
        """The per-call ceiling in the contender's compute dtype (fused structure, or fused training)."""
        if peaks is None or roofline.precision_key(dtype, device.type) not in peaks.tflops:
            return None
        c = ceilings(group.model, group.batch, profile.image_size, dtype, device.type, peaks)
        return group.batch / c["train" if train else "fused"] * 1e3

    rows: dict[str, dict[str, Any]] = {}
    plan = cont.plan(group, profile, device)
    for c in plan:
        rows[c.name] = base(
            {
                "group": str(group),
                "model": group.model,
                "mode": group.mode,
                "contender": c.name,
                "backend": c.backend or "",
                "dtype": dtype_name(c.compute_dtype),
                "autocast": bool(c.autocast),
                "memory_format": "channels_last" if c.memory_format == torch.channels_last else "nchw",
                "batch": group.batch,
                "image_size": profile.image_size,
                "gflop_per_call": gflop,
                "notes": c.note,
                "ceiling_ms": ceiling_ms(c.compute_dtype),
            }
        )
    # The CUDA-graph replays are built and timed after the others are timed: a fault in one (it happened once,
    # cause not yet found) ends the process's CUDA context, and must not take the other rows with it.
    for phase in ([c for c in plan if c.compile_mode != "graph"], [c for c in plan if c.compile_mode == "graph"]):
        _build_and_time(phase, rows, group, profile, device, model, (x, target, reference), gflop, progress, deadline)
    parity.judge(rows.values(), device)
    eager = next(iter(rows.values()))  # plan() puts plain eager first
    for row in rows.values():
        if row.get("images_per_s") and eager.get("images_per_s"):
            row["speedup_vs_eager"] = row["images_per_s"] / eager["images_per_s"]
    del model
    _reset_compiler()
    free_memory(device)
    return list(rows.values())


def _build_and_time(
    plan: list[cont.Contender],
    rows: dict[str, dict[str, Any]],
    group: Group,
    profile: Profile,
    device: torch.device,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gflop: float,
    progress: Progress,
    deadline: float,
) -> None:
    """Builds, checks and warms up each contender of `plan`, then times them interleaved, filling their rows.
    data: the fp32 input, the labels and the reference logits."""
    x, target, reference = data
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    best: dict[str, float] = {}
    for c in plan:
        row = rows[c.name]
        if c.skip or time.monotonic() > deadline:
            row.update(status="skipped", error=c.skip or OUT_OF_TIME)
            continue
        progress.note(f"{group}: {c.name}")
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            mem_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            step = cont.build(c, model, x, target, group.mode)
            t0 = time.perf_counter()
            out = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            # A copy before the next call can overwrite it (CUDA-graph outputs live in static buffers).
            out = out.to(torch.float64, copy=True)
            row["rel_err"], row["max_abs_err"] = relative_error(out, reference), max_abs_error(out, reference)
            best[c.name] = warm_up(step, device, profile.warmup_s)
            if device.type == "cuda":
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - mem_before) / 2**20
            steps[c.name] = step
            row["status"] = "ok"
        except Exception as err:  # a failing contender is a result, not the end of the run
            row.update(status="failed", error=one_line(err))
        if row["status"] == "failed":  # outside the except: its traceback pinned the contender's tensors
            step = None
            free_memory(device)
    if not steps:
        return
    progress.note(f"{group}: timing {len(steps)} contenders interleaved")
    inner = {name: inner_calls(best[name], group.batch, device) for name in steps}
    rounds = rounds_for(profile, sum(best[n] * inner[n] for n in steps), profile.seconds_per_group)
    try:
        timings = time_interleaved(
            steps, device, rounds, inner, budget_s=profile.seconds_per_group, min_rounds=profile.min_rounds
        )
    except Exception as err:  # a kernel fault, say: the rows say so instead of the run ending without them
        for name in steps:
            rows[name].update(status="failed", error="during the interleaved timing: " + one_line(err))
        return
    for name, t in timings.items():
        row = rows[name]
        row.update(timing_fields(t, group.batch))
        row["tflops"] = gflop / t.median  # GFLOP per ms = TFLOP/s
        if row["ceiling_ms"] is not None:
            row["pct_ceiling"] = row["ceiling_ms"] / t.median
