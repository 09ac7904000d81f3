"""Synchronized BatchNorm statistics across processes (SyncBN), for the fused training path.

Marking: `enable_sync_bn(model, process_group)` tags the model's nn.BatchNorm2d modules; the fused functional
reads the tag in training and then normalizes with the statistics of the global batch. The modules keep their
type (nn.SyncBatchNorm would not be recognised by the fused blocks) and their state_dict keys.

Forward: every process all-gathers its per-channel (count, mean, M2) partials, and all merge them with Chan's
formula (stats.merge_partials) — exact for unequal local batch sizes, and it works on gloo (CPU) and NCCL.
Backward: BN's input gradient needs Σg and Σg·(y − mean) over the global batch; they are all-reduced (sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .stats import BatchStats, merge_partials

_SYNC_ATTR = "_fused_resnet_sync_bn"


@dataclass(frozen=True, eq=False)
class _SyncMark:
    """The process group a BN synchronizes over (None: the default group)."""

    group: Any = None

    # A process group cannot be copied or pickled; deepcopy(model) (e.g. for an EMA) shares the mark.
    def __deepcopy__(self, memo: dict) -> _SyncMark:
        return self


def enable_sync_bn(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Makes every nn.BatchNorm2d in `model` use global-batch statistics when training (in place; returns model).

    Only the fused training path synchronizes (any backend but "reference"); without an initialized process
    group, or with one process, statistics stay local.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.__dict__[_SYNC_ATTR] = _SyncMark(process_group)
    return model


def disable_sync_bn(model: nn.Module) -> nn.Module:
    """Undoes enable_sync_bn (in place; returns model)."""
    for module in model.modules():
        module.__dict__.pop(_SYNC_ATTR, None)
    return model


def sync_group(bn: nn.Module) -> Any | None:
    """The process group `bn` synchronizes over, or None where its statistics stay local."""
    mark = bn.__dict__.get(_SYNC_ATTR)
    if mark is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = mark.group if mark.group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_gather_stats(stats: BatchStats, group: Any) -> BatchStats:
    """The global (count, mean, M2) per channel from every process's local ones."""
    local = torch.stack(tuple(stats)).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    count, mean, m2 = torch.stack(gathered).unbind(1)
    return merge_partials(BatchStats(count, mean, m2), dim=0)


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sums `tensor` over the processes of `group` (in place; returns it)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
