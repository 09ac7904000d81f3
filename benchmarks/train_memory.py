"""Peak memory of one training step (forward + backward), fused vs stock torchvision in channels_last.

On CUDA it reads torch.cuda.max_memory_allocated; on CPU, where PyTorch keeps no allocator statistics, it tracks
every tensor through torch.distributed._tools.mem_tracker.MemTracker (a private PyTorch tool: checked with torch
2.14). Parameters and their gradients are included in both. Both contenders start from the same randomly
initialised weights and see the same input; only the one measured is on the device.

    python benchmarks/train_memory.py --model resnet50 --batch 48 --size 128 [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import fused_resnet


def _step(model: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().sum().backward()

    return run


def peak_bytes(step: Callable[[], None], model: nn.Module, device: torch.device) -> int:
    """Peak bytes allocated on `device` while step() runs model."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    tv = getattr(torchvision.models, args.model)(num_classes=1000).train()
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last).to(device)
    models = {
        "stock channels_last": copy.deepcopy(tv).to(memory_format=torch.channels_last),
        "fused": fused_resnet.fuse(tv),
    }
    peaks = {}
    for name, model in models.items():
        model.to(device)
        step = _step(model, x, args.bf16)
        step()  # warm-up: lazy state (weight caches, cuDNN plans) is not part of the step's peak
        model.zero_grad(set_to_none=True)
        peaks[name] = peak_bytes(step, model, device)
        model.zero_grad(set_to_none=True)
        model.to("cpu")
    dtype = "bf16 autocast" if args.bf16 else "fp32"
    print(f"{args.model} batch {args.batch} {args.size}x{args.size} {dtype} on {device}: peak of one train step")
    stock = peaks["stock channels_last"]
    for name, peak in peaks.items():
        print(f"  {name:20s} {peak / 2**20:10.1f} MiB  {peak / stock:.3f}x stock")


if __name__ == "__main__":
    main()
