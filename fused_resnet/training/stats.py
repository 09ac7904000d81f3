"""Per-channel batch statistics for train-mode BatchNorm: partials (count, mean, M2), their merge, and finalize.

Statistics are carried as (count, mean, M2) with M2 = Σ(x − mean)², never as (Σx, Σx²): the variance from
sums, Σx²/n − (Σx/n)², cancels catastrophically once |mean| ≫ std (fp32 loses every digit when mean/std ≈ 3e3).
Each chunk (here: one image's H·W pixels of one channel, as a GPU conv's epilogue would emit per tile) is
reduced two-pass, and chunks are combined with Chan et al.'s parallel formula, which stays exact for any
split. The same merge combines the partials of several processes for synchronized BN (sync.py).

The side effects (running stats, num_batches_tracked) happen once per forward: running_update() counts the batch
and says by how much the running stats move, and then exactly one of finalize(), channel_math.finalize_scale_shift
or cpp_passes.stats_finalize moves them, outside any autotuned kernel (autotuning re-runs kernels and would repeat
the update).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class BatchStats(NamedTuple):
    """Per-channel count, mean and M2 = Σ(x − mean)², each of shape [..., C] in the accumulation dtype."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other dtype accumulates in fp32 (bf16/fp16 sums would lose the mean)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_stats(y: torch.Tensor) -> BatchStats:
    """Partials of a (N, C, H, W) tensor, one chunk per image: each of shape [N, C] (any memory format)."""
    acc = accumulation_dtype(y.dtype)
    n, c, h, w = y.shape
    mean = y.mean(dim=(2, 3), dtype=acc)
    m2 = (y.to(acc) - mean[:, :, None, None]).square().sum(dim=(2, 3))
    count = torch.full((n, c), float(h * w), dtype=acc, device=y.device)
    return BatchStats(count, mean, m2)


# Chan, Golub & LeVeque (1979), k-way form: with n = Σ nᵢ and μ = Σ nᵢ·μᵢ / n,
#   M2 = Σ M2ᵢ + Σ nᵢ·(μᵢ − μ)²
# (the pairwise update M2 = M2a + M2b + δ²·na·nb/n, δ = μb − μa, applied to all parts at once). Empty parts
# (nᵢ = 0) contribute nothing.
def merge_partials(stats: BatchStats, dim: int = 0) -> BatchStats:
    """Merges partials along `dim` into one (count, mean, M2) per channel."""
    count = stats.count.sum(dim)
    weight = stats.count / count.clamp_min(1).unsqueeze(dim)
    mean = (weight * stats.mean).sum(dim)
    m2 = stats.m2.sum(dim) + (stats.count * (stats.mean - mean.unsqueeze(dim)).square()).sum(dim)
    return BatchStats(count, mean, m2)


def batch_stats(y: torch.Tensor) -> BatchStats:
    """Per-channel (count, mean, M2) of y over N, H, W: per-image chunks merged with Chan's formula."""
    return merge_partials(chunk_stats(y), dim=0)


def total_count(stats: BatchStats) -> int:
    """The number of values per channel in merged statistics (the same for every channel)."""
    return int(stats.count.reshape(-1)[0].item()) if stats.count.numel() else 0


def check_count(count: int) -> None:
    """nn.BatchNorm2d's refusal of a batch with one value per channel (its variance is undefined)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} value(s) per channel")


def buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    """getattr(module, name) for a buffer: read from the module's buffer dict, where nn.Module's attribute fallback
    costs ~0.7 µs of host time a lookup, several per training unit; a name that is no buffer (a plain attribute set
    in its place) is looked up as an attribute, as before (an audit: its statistics stopped moving)."""
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name)


def running_update(bn: nn.BatchNorm2d) -> tuple[bool, float]:
    """Whether nn.BatchNorm2d would move bn's running stats in this forward, and the factor it would move them by
    (momentum, or 1/num_batches_tracked for momentum=None); counts the batch in num_batches_tracked where it
    would. Once per forward: it is the update's one side effect on the host."""
    counts = bn.training and bn.track_running_stats
    update = counts and buffer(bn, "running_mean") is not None
    momentum = bn.momentum
    factor = 0.0 if momentum is None else momentum
    # Counted wherever nn.BatchNorm2d counts it: also where the running buffers were set to None.
    tracked = buffer(bn, "num_batches_tracked")
    if counts and tracked is not None:
        with torch.no_grad():
            tracked.add_(1)
        if update and momentum is None:
            factor = 1.0 / float(tracked)
    return update, factor


def bump_versions(*tensors: torch.Tensor) -> None:
    """After a kernel wrote running stats through pointers: bump their version counters as lerp_ would, or caches
    keyed on them (the eval-mode BN fold, nn/folding.py) would keep folding the old statistics."""
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)


def finalize(stats: BatchStats, bn: nn.BatchNorm2d, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) to normalize with, and the running-stat update of nn.BatchNorm2d.forward, done once.

    Normalizes with the biased variance M2/n; running_var moves towards the unbiased M2/(n − 1); momentum=None
    is a cumulative moving average (factor 1/num_batches_tracked). Running stats are updated only where
    nn.BatchNorm2d would: in training mode with track_running_stats. `count`, the values per channel, is read
    from the statistics unless the caller knows it from the shapes (no host sync, traceable by torch.compile).
    """
    if count is None:
        count = total_count(stats)
    check_count(count)
    mean = stats.mean
    invstd = torch.rsqrt(stats.m2 / count + bn.eps)
    update, factor = running_update(bn)
    if update:
        with torch.no_grad():
            unbiased = stats.m2 / (count - 1)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return mean, invstd
