"""The largest training batch that fits in GPU memory, per contender (mode "max-batch" rows).

Fused training keeps no normalized or post-ReLU activations (it remakes them in backward from the raw conv outputs,
design.md §3), so it should fit larger batches: this measures it for ResNet-152 at 224×224 and a deep
pre-activation CIFAR net (if fused_resnet has one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import backends
from . import contenders as cont
from .profiles import dtype_name
from .progress import Progress
from .runner import free_memory, make_model, one_line, timing_fields
from .timing import time_interleaved

# (model, image size, classes): fused_resnet.models.<name> for the pre-activation net, else torchvision's.
CASES = (("resnet152", 224, 1000), ("preact_resnet1001", 32, 10))
START_BATCH = 64
LIMIT = 1 << 15


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch in [1, limit] for which fits(batch) is True (0 if none), assuming fits is monotonic:
    double from `start` until a failure, then bisect down to 1/16 of the answer."""
    lo, hi = 0, limit + 1
    batch = start
    while 1 <= batch <= limit:
        if fits(batch):
            lo = batch
            if batch == limit:
                return lo
            batch = min(2 * batch, limit)
        else:
            hi = batch
            if lo:
                break
            batch //= 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _network(model_name: str, c: cont.Contender, device: torch.device) -> nn.Module:
    from fused_resnet import models

    if model_name.startswith("preact"):
        return getattr(models, model_name)(backend=c.backend or "auto").to(device)
    return cont.network(c, make_model(model_name, 224, device), train=True)


def _contenders(model_name: str, device: torch.device, dtype: torch.dtype) -> list[cont.Contender]:
    """The stock baseline and the fastest fused backend (the first available in "auto" order)."""
    cl = torch.channels_last
    fast = [b for b in cont.DEVICE_BACKENDS[device.type] if b != "reference" and backends.unavailable_reason(b) is None]
    fused = [cont.Contender(f"fused:{b}+autocast", "fused", cl, torch.float32, dtype, backend=b) for b in fast[:1]]
    if model_name.startswith("preact"):
        # fused:reference runs the same model with stock PyTorch ops: the baseline
        baseline = cont.Contender("fused:reference+autocast", "fused", cl, torch.float32, dtype, backend="reference")
    else:
        baseline = cont.Contender("eager_cl+autocast", "eager", cl, torch.float32, dtype)
    return [baseline, *fused]


def run_max_batch(
    device: torch.device,
    dtype: torch.dtype,
    base: Callable[[dict[str, Any]], dict[str, Any]],
    progress: Progress,
    deadline: float,
) -> list[dict[str, Any]]:
    from fused_resnet import models

    rows = []
    for model_name, size, classes in CASES:
        common = {
            "group": f"{model_name} max-batch",
            "model": model_name,
            "mode": "max-batch",
            "dtype": dtype_name(dtype),
            "autocast": True,
            "memory_format": "channels_last",
            "image_size": size,
        }
        if model_name.startswith("preact") and not hasattr(models, model_name):
            rows.append(
                base(
                    {
                        **common,
                        "contender": "-",
                        "status": "skipped",
                        "error": f"fused_resnet.models has no {model_name} yet",
                    }
                )
            )
            continue
        for c in _contenders(model_name, device, dtype):
            row = base({**common, "contender": c.name, "backend": c.backend or ""})
            rows.append(row)
            if device.type != "cuda":
                row.update(status="skipped", error="needs CUDA (on a CPU running out of memory is not an exception)")
                continue
            if time.monotonic() > deadline:
                row.update(status="skipped", error="time budget exhausted")
                continue
            progress.note(f"max batch {model_name} {c.name}")
            try:
                net = _network(model_name, c, device)
                row.update(_search(net, c, size, classes, device))
                row["status"] = "ok"
            except Exception as err:
                row.update(status="failed", error=one_line(err))
            net = None
            free_memory(device)
    return rows


def _search(net: nn.Module, c: cont.Contender, size: int, classes: int, device: torch.device) -> dict[str, Any]:
    def steps(batch: int) -> Callable[[], torch.Tensor]:
        x = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, classes, (batch,), device=device)
        return cont.make_step(c, net, x, target, train=True)

    def fits(batch: int) -> bool:
        try:
            step = steps(batch)
            step()
            step()
            torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            step = None
            net.zero_grad(set_to_none=True)
            free_memory(device)

    best = largest_fitting(fits, START_BATCH, LIMIT)
    if best == 0:
        return {"batch": 0, "error": f"no batch size fits, not even {START_BATCH}"}
    torch.cuda.reset_peak_memory_stats(device)
    step = steps(best)
    step()
    timing = time_interleaved({"step": step}, device, rounds=3)["step"]
    return {
        "batch": best,
        **timing_fields(timing, best),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
        "notes": "largest batch (within 1/16) whose training step fits; peak is the whole process",
    }
