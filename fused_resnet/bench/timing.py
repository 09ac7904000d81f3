"""Timing: interleaved repeats of several callables, per-call samples, medians and quantiles.

GPU: each sample is bracketed by CUDA events after a synchronize (so a sample is the device time of `inner`
back-to-back calls, launch gaps included), optionally after flushing L2 (what triton.testing.do_bench does).
Beside it go the host's time to enqueue the calls (near the sample itself: the host set the pace, or a full launch
queue held it back; well below it: the GPU did) and the caching allocator's cudaMalloc calls and out-of-memory
retries during the samples (a retry frees cached blocks, which waits for the device: several contenders alive in
one process can make each other's steps do that).
With hide_launch, a spin kernel keeps the GPU busy while the host enqueues the calls, so that the sample is the
calls' GPU time alone: without it, a sample of one call also holds the host's time to launch it, which was most
of each per-layer sample on an H200 (a fused op's Python path took 0.2-0.5 ms there against 0.1-0.3 ms kernels).
CPU: perf_counter around `inner` calls. Contenders are interleaved round by round, in a rotating order, so slow
drifts of the machine (other jobs, clocks) spread over all of them instead of favouring whoever ran first.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call times of one contender in milliseconds."""

    samples_ms: tuple[float, ...]
    host_ms: tuple[float, ...] = ()  # per sample, the host's time to enqueue the calls, per call (GPU only)
    cuda_mallocs: int = 0  # the caching allocator's cudaMalloc calls during the samples (GPU only)
    alloc_retries: int = 0  # its retries after an out-of-memory cudaMalloc, each after freeing cached blocks

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile (q in [0, 1]) of the samples."""
        ordered = sorted(self.samples_ms)
        if len(ordered) == 1:
            return ordered[0]
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flusher(device: torch.device) -> Callable[[], None] | None:
    """A callable that evicts the GPU's L2 cache by writing a 256 MB buffer (None on CPU)."""
    if device.type != "cuda":
        return None
    buffer = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return buffer.zero_


# Spin time per call enqueued ahead of a hide_launch sample: several times what the host needs to launch one
# call (0.2-0.5 ms seen on an H200 machine), so that a calibration at lower clocks still leaves enough.
HIDE_LAUNCH_MS_PER_CALL = 5.0


@functools.cache
def _spin_cycles_per_ms(device_index: int) -> float:
    """torch.cuda._sleep's cycles per millisecond on this GPU, measured once (after a longer spin, so that the
    clocks have left their idle level: an idle H200 reads 345 MHz against 1980 MHz under load)."""
    cycles = 4_000_000
    with torch.cuda.device(device_index):
        torch.cuda._sleep(4 * cycles)  # outside the measurement: a first launch, and time for the clocks to rise
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / start.elapsed_time(end)


def time_block(
    fn: Callable[[], object],
    device: torch.device,
    inner: int,
    flush: Callable[[], None] | None,
    hide_launch: bool = False,
) -> float:
    """Milliseconds per call of `inner` back-to-back calls of fn (GPU time alone with hide_launch, on a GPU)."""
    return _timed_block(fn, device, inner, flush, hide_launch)[0]


def _timed_block(
    fn: Callable[[], object],
    device: torch.device,
    inner: int,
    flush: Callable[[], None] | None,
    hide_launch: bool,
) -> tuple[float, float | None]:
    """(ms per call, the host's ms per call to enqueue them, None on CPU) of `inner` back-to-back calls of fn."""
    if flush is not None:
        flush()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_launch:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda._sleep(int(HIDE_LAUNCH_MS_PER_CALL * inner * _spin_cycles_per_ms(index)))
        start.record()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        host_ms = (time.perf_counter() - t0) * 1e3 / inner
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner, host_ms
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner, None


def _allocator_counts(device: torch.device) -> tuple[int, int]:
    """(cudaMalloc calls, out-of-memory retries) of the caching allocator so far; zeros on CPU."""
    if device.type != "cuda":
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


def warm_up(fn: Callable[[], object], device: torch.device, seconds: float, min_calls: int = 2) -> float:
    """Calls fn for about `seconds` (at least min_calls times) and returns the fastest per-call ms seen."""
    best = math.inf
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < min_calls or time.perf_counter() < deadline:
        best = min(best, time_block(fn, device, 1, None))
        calls += 1
    return best


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    inner: Mapping[str, int] | None = None,
    flush: Callable[[], None] | None = None,
    budget_s: float | None = None,
    min_rounds: int = 3,
    hide_launch: bool = False,
) -> dict[str, Timing]:
    """Times every callable once per round, rotating the order each round; returns per-call Timings.

    At most `rounds` rounds; with a budget, no new round starts after budget_s seconds once min_rounds are done.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    host: dict[str, list[float]] = {name: [] for name in names}
    mallocs = dict.fromkeys(names, 0)
    retries = dict.fromkeys(names, 0)
    start = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            n = inner.get(name, 1) if inner else 1
            mallocs_before, retries_before = _allocator_counts(device)
            ms, host_ms = _timed_block(fns[name], device, n, flush, hide_launch)
            mallocs_after, retries_after = _allocator_counts(device)
            samples[name].append(ms)
            if host_ms is not None:
                host[name].append(host_ms)
            mallocs[name] += mallocs_after - mallocs_before
            retries[name] += retries_after - retries_before
    return {name: Timing(tuple(samples[name]), tuple(host[name]), mallocs[name], retries[name]) for name in names}


def best_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """The fastest of `repeats` timed calls after two warm-up calls (for peak-throughput probes)."""
    warm_up(fn, device, 0.0)
    return min(time_block(fn, device, 1, None) for _ in range(repeats))
