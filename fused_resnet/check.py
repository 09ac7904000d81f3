"""Parity harness: a fused model against its torchvision twin, eval and train, forward and backward.

    python -m fused_resnet.check [--models resnet18 resnet50] [--dtypes float32 bfloat16] [--device cuda]

For each model and dtype it compares, against torchvision run in fp64 on the same (dtype-rounded) weights and
input: eval logits, train-mode logits (batch statistics), the input gradient, all parameter gradients, the BN
running statistics after the train step, and eval logits after one SGD step. Stock torchvision run in the same
dtype is measured beside it, so a reduced-precision error can be read against what PyTorch itself gives.
Tolerances live in fused_resnet/tolerances.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import models
from .backends import BackendError, requested_backend
from .fuse import fuse
from .tolerances import forward_rtol, grad_rtol, max_abs_error, relative_error, within_tolerance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class ParityRow:
    model: str
    dtype: str
    quantity: str
    rel_error: float
    max_abs: float
    stock_rel_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return within_tolerance(self.rel_error, self.tolerance, self.stock_rel_error)


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running stats, weight and bias: default-initialised BN is nearly the identity and hides bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features

                def rand(lo: float, hi: float, n: int = n) -> torch.Tensor:
                    return torch.rand(n, generator=gen) * (hi - lo) + lo

                m.running_mean.copy_(rand(-0.5, 0.5))
                m.running_var.copy_(rand(0.5, 2.0))
                if m.weight is not None:
                    m.weight.copy_(rand(0.5, 1.5))
                    m.bias.copy_(rand(-0.2, 0.2))
    return model


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(0)


def _measure(model: nn.Module, x: torch.Tensor, grad_seed: int = 1) -> dict[str, torch.Tensor]:
    """Runs the protocol on `model` (modified: one SGD step) and returns each quantity flattened."""
    out: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        out["eval forward"] = model(x).double()
    model.train()
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    out["train forward"] = logits.double()
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed)).to(logits)
    (logits * weight).sum().backward()
    out["input grad"] = xg.grad.double()
    params = [p for p in model.parameters() if p.grad is not None]
    out["param grads"] = _flat([p.grad for p in params])
    out["running stats"] = _flat([b for n, b in model.named_buffers() if "running" in n])
    # A step of fixed total length: random-weight nets have huge gradients, and a fixed learning rate would
    # throw them into overflow, measuring nothing.
    lr = 1e-2 / max(out["param grads"].norm().item(), 1e-12)
    with torch.no_grad():
        for p in params:
            p -= (lr * p.grad.double()).to(p.dtype)
    model.eval()
    with torch.no_grad():
        out["eval after SGD step"] = model(x).double()
    return out


def compare(
    name: str,
    reference: nn.Module,
    candidate: nn.Module,
    x: torch.Tensor,
    dtype: torch.dtype,
) -> list[ParityRow]:
    """ParityRows of `candidate` (a fused model) vs `reference` (torchvision, same weights) in `dtype`.

    The reference is torchvision in fp64 on the weights and input rounded to `dtype`; stock torchvision in
    `dtype` is measured against it too (stock_rel_error).
    """
    device = x.device
    rounded = copy.deepcopy(reference).to(dtype)
    expected = _measure(copy.deepcopy(rounded).double(), x.to(dtype).double())
    stock = expected if dtype == torch.float64 else _measure(rounded, x.to(dtype))
    actual = _measure(copy.deepcopy(candidate).to(dtype), x.to(dtype))
    rows = []
    for quantity, want in expected.items():
        tol = forward_rtol(dtype, device) if "forward" in quantity else grad_rtol(dtype, device)
        rows.append(
            ParityRow(
                model=name,
                dtype=str(dtype).removeprefix("torch."),
                quantity=quantity,
                rel_error=relative_error(actual[quantity], want),
                max_abs=max_abs_error(actual[quantity], want),
                stock_rel_error=relative_error(stock[quantity], want),
                tolerance=tol,
            )
        )
    return rows


def check_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    shape: tuple[int, ...] = (2, 3, 64, 64),
    backend: str = "auto",
    seed: int = 0,
) -> list[ParityRow]:
    """Builds torchvision's `name` with random weights and BN stats, fuses it and compares the two."""
    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)
    torch.manual_seed(seed)
    reference = randomize_bn_(builder(), seed).to(device)
    candidate = fuse(reference, backend=backend)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return compare(name, reference, candidate, x, dtype)


def format_table(rows: list[ParityRow]) -> str:
    head = "| model | dtype | quantity | rel. error | max abs | stock rel. error | tolerance | result |"
    # result: pass when rel. error <= max(tolerance, STOCK_FACTOR x stock rel. error); see tolerances.py
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.dtype} | {r.quantity} | {r.rel_error:.2e} | {r.max_abs:.2e} | "
            f"{r.stock_rel_error:.2e} | {r.tolerance:.0e} | {'pass' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines)


def default_dtypes(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["float32", "bfloat16", "float16"]
    return ["float32", "float64"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.check", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], choices=models.TORCHVISION_BUILDERS)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 3, 64, 64], metavar=("N", "C", "H", "W"))
    parser.add_argument("--save", type=Path, help="also write the table to this file (make bench: bench-out/parity.md)")
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or args.shape[0] < 2:  # an empty tensor's errors are 0: a pass that tested nothing
        parser.error(f"--shape needs at least 2 images (train-mode BN) and no empty dimension, got {args.shape}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here")
    try:
        requested_backend(args.backend)
    except ValueError as err:
        parser.error(str(err))
    rows = []
    try:
        for model in args.models:
            for dtype in args.dtypes or default_dtypes(args.device):
                rows += check_model(model, DTYPES[dtype], args.device, tuple(args.shape), args.backend)
    except BackendError as err:  # a backend that cannot run here: its message says why
        parser.error(str(err))
    failed = [r for r in rows if not r.passed]
    text = f"{format_table(rows)}\n\n{len(rows) - len(failed)} passed, {len(failed)} failed"
    print(text)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(f"shape {tuple(args.shape)}, device {args.device}, backend {args.backend!r}\n\n{text}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
