"""Train a small ResNet on scikit-learn's 8×8 digits, fused against stock torchvision, from the same seed.

    python -m fused_resnet.examples.train_digits [--epochs 4] [--size 16] [--batch-size 64]

Both models start from identical weights (the fused one is fuse() of the torchvision one), see the same
batches in the same order and use the same optimizer; they differ only in how conv → BN → [+ residual] → ReLU
runs. Prints test accuracy and training time of each. Needs scikit-learn (for the data set only).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..fuse import fuse


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1797 digits as (N, 1, size, size) float32, upsampled bilinearly and standardized; a fixed split."""
    from sklearn.datasets import load_digits as sklearn_digits  # optional dependency: only this example needs it

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Digits(x[train], y[train], x[test], y[test])


def stock_model(width: int = 16, seed: int = 0) -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (a ResNet-10) for 1-channel input, with stage widths
    width·(1, 2, 4, 8) instead of 64·(1, 2, 4, 8): built by torchvision's own _make_layer, so it stays a
    torchvision ResNet that fuse() converts; 64 is torchvision's ResNet-18 width, 16 trains ~16× faster."""
    torch.manual_seed(seed)
    model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.inplanes = width
    model.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i in range(4):
        setattr(model, f"layer{i + 1}", model._make_layer(BasicBlock, width * 2**i, 1, stride=1 if i == 0 else 2))
    model.fc = nn.Linear(width * 8, 10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def train(model: nn.Module, data: Digits, epochs: int, batch_size: int, lr: float, seed: int = 0) -> float:
    """Trains `model` in place (SGD + momentum, cosine schedule); returns the wall time in seconds."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(data.y_train) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        # Full batches only: a last batch of one image would leave BN a single value per channel at 1×1.
        order = torch.randperm(len(data.y_train), generator=gen)[: steps // epochs * batch_size]
        for idx in order.view(-1, batch_size):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            schedule.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def compare(
    epochs: int = 4, size: int = 16, batch_size: int = 64, lr: float = 0.05, width: int = 16, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """{"stock"|"fused": (test accuracy, seconds)} for the two models trained from the same seed."""
    data = load_digits(size, seed=seed)
    stock = stock_model(width, seed)
    fused = fuse(copy.deepcopy(stock))
    results = {}
    for name, model in (("stock", stock), ("fused", fused)):
        seconds = train(model, data, epochs, batch_size, lr, seed)
        results[name] = (accuracy(model, data.x_test, data.y_test), seconds)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fused_resnet.examples.train_digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="upsampled image side (the digits are 8×8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=16, help="first stage's channels (torchvision: 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = compare(args.epochs, args.size, args.batch_size, args.lr, args.width, args.seed)
    print(
        f"digits {args.size}x{args.size}, ResNet-10 width {args.width}, {args.epochs} epochs, "
        f"batch {args.batch_size}, seed {args.seed}"
    )
    for name, (acc, seconds) in results.items():
        print(f"  {name:5s}  test accuracy {acc:.4f}  train time {seconds:.1f} s")


if __name__ == "__main__":
    main()
