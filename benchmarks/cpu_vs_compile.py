"""The CPU target of the extension issue, measured head to head: the fused `cpu` backend against
`torch.compile` with `freezing=True`, both on channels_last, fp32 inference, calls alternating round by round
(the order flipped every round) so that the machine's noise falls on both alike; prints the median per-round
speedup of the fused model. On the shared 2-core machines the bench's group timings swing by 10-20 % from run to
run; this pairs every fused call with a compiled one.

    python benchmarks/cpu_vs_compile.py --batch 1 --rounds 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

import fused_resnet


def _random_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    # Non-trivial running statistics, so that the folded weights differ from the conv's own.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def head_to_head(model_name: str, batch: int, size: int, rounds: int) -> dict[str, float]:
    """Median ms per call of each contender and the median per-round ratio compiled / fused (> 1: fused faster)."""
    torch.manual_seed(0)
    stock = _random_bn_stats(getattr(torchvision.models, model_name)()).eval().to(memory_format=torch.channels_last)
    contenders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fused": fused_resnet.fuse(stock, backend="cpu"),
        "compile_freezing": torch.compile(stock, options={"freezing": True}),
    }
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for run in contenders.values():  # compile, fold, prepack, warm up
            for _ in range(3):
                run(x)
        for r in range(rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                start = time.perf_counter()
                contenders[name](x)
                times[name].append(time.perf_counter() - start)
    ratios = [c / f for f, c in zip(times["fused"], times["compile_freezing"], strict=True)]
    return {
        "fused_ms": statistics.median(times["fused"]) * 1e3,
        "compile_freezing_ms": statistics.median(times["compile_freezing"]) * 1e3,
        "speedup": statistics.median(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    r = head_to_head(args.model, args.batch, args.size, args.rounds)
    print(
        f"{args.model} batch {args.batch} {args.size}x{args.size} fp32 channels_last, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds: fused cpu {r['fused_ms']:.1f} ms, "
        f"compile+freezing {r['compile_freezing_ms']:.1f} ms, median per-round speedup of fused {r['speedup']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
