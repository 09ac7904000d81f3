"""Synchronized BN statistics: 2 processes on gloo (CPU) against one process over the concatenated global batch.

Each rank runs a part of the batch (unequal parts for the module check, so Chan's merge is exercised with
different counts); the reference is stock nn.Conv2d → nn.BatchNorm2d (and a stock-ops model) in one process.
"""

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fused_resnet import ConvBNAct, set_backend
from fused_resnet.check import randomize_bn_
from fused_resnet.models import CifarResNet
from fused_resnet.tolerances import relative_error
from fused_resnet.training import enable_sync_bn

WORLD = 2
SPLIT = (3, 5)  # rows of the global batch of 8 per rank, for the module check
STEPS = 2


def _module() -> ConvBNAct:
    torch.manual_seed(0)
    return randomize_bn_(ConvBNAct(4, 6, 3, padding=1, momentum=None)).double()


def _module_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 5, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(8, 6, 5, 5, generator=gen, dtype=torch.float64), torch.randn(8, 6, 5, 5, generator=gen)


def _model() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(1, num_classes=5, option="B").double()


def _model_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 5, (8,), generator=gen)


def _train(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, params: list[nn.Parameter]) -> None:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # 1. one ConvBNAct, unequal local batches, forward + backward + running stats over three calls
        m = enable_sync_bn(_module())
        x, r, g = _module_data()
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        x, r = x[lo:hi].clone().requires_grad_(True), r[lo:hi].clone().requires_grad_(True)
        for _ in range(3):
            out = m(x, r)
        out.backward(g[lo:hi].double())
        grads = [x.grad, r.grad, m.conv.weight.grad, m.bn.weight.grad, m.bn.bias.grad]
        # 2. a fused model under DistributedDataParallel with synchronized BN, equal halves of the batch
        model = enable_sync_bn(_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        xm, labels = _model_data()
        half = slice(rank * 4, rank * 4 + 4)
        _train(ddp, xm[half], labels[half], list(ddp.parameters()))
        torch.save({"out": out, "grads": grads, "bn": m.bn.state_dict(), "model": model.state_dict()},
                   Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_sync_bn_matches_one_process_over_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(WORLD)]

    # 1. module: stock conv → BN → + r → ReLU on the whole batch
    plain = _module()
    x, r, g = _module_data()
    x.requires_grad_(True)
    r.requires_grad_(True)
    for _ in range(3):
        want = torch.relu(plain.bn(plain.conv(x)) + r)
    want.backward(g.double())
    got_out = torch.cat([d["out"] for d in ranks])
    assert relative_error(got_out, want) < 1e-12
    # input-sized gradients are per-rank slices; parameter gradients are per-rank partial sums
    for i, want_grad in enumerate((x.grad, r.grad)):
        assert relative_error(torch.cat([d["grads"][i] for d in ranks]), want_grad) < 1e-10
    for i, p in enumerate((plain.conv.weight, plain.bn.weight, plain.bn.bias), start=2):
        assert relative_error(sum(d["grads"][i] for d in ranks), p.grad) < 1e-10
    for d in ranks:
        for key, value in plain.bn.state_dict().items():
            torch.testing.assert_close(d["bn"][key], value, rtol=1e-12, atol=1e-15, msg=key)

    # 2. DDP + SyncBN training == one process on the global batch with stock ops (backend="reference")
    reference = set_backend(_model(), "reference")
    xm, labels = _model_data()
    _train(reference, xm, labels, list(reference.parameters()))
    for d in ranks:
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(d["model"][key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert copy.deepcopy(enable_sync_bn(_model())) is not None  # the mark survives deepcopy (EMA copies etc.)
