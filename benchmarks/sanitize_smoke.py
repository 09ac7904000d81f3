"""A tiny workload for compute-sanitizer (run by `gpu_check.sh --stage sanitize`): every fused backend of the
device on a few small conv shapes (odd sizes, stride 2, residual, 1x1 and 7x7), forward and backward, and one
fused ResNet-18 training step, each checked against the reference backend; on CUDA also a fused ResNet-18 forward
captured in a CUDA graph and replayed between eager calls (a bench run once ended in an illegal memory access while
timing such replays). On a CPU it checks the script itself.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_smoke.py
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fused_resnet import backends, models
from fused_resnet.bench.contenders import engine_scope, engine_unfit, hopper_engine_runs, other_cuda_engines
from fused_resnet.nn.functional import conv_bn_act
from fused_resnet.tolerances import forward_rtol, relative_error

# (N, Cin, H, W, Cout, kernel, stride, residual)
SHAPES = [
    (2, 8, 9, 7, 16, 3, 1, True),
    (1, 16, 11, 11, 8, 3, 2, False),
    (2, 4, 8, 8, 16, 1, 2, False),
    (1, 3, 17, 15, 16, 7, 2, False),
    (2, 16, 9, 7, 24, 1, 1, True),  # 1x1 stride 1: the Hopper engine's GEMM path ('cutlass_next'; the trial's own)
    (1, 8, 9, 7, 72, 3, 1, True),  # over 64 output channels with a residual: the wide conv, one partial N tile
    (1, 24, 9, 7, 136, 3, 2, False),  # and without one: 'cutlass_trial' runs it on its persistent conv
    (1, 16, 9, 7, 136, 3, 2, False),  # at most 16 input channels: the trial's stem tiles, three partial N tiles
]
DEVICE_BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def _case(shape: tuple, backend: str, device: torch.device, dtype: torch.dtype) -> float:
    n, cin, h, w, cout, k, stride, with_residual = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).to(device, dtype).eval()
    bn = nn.BatchNorm2d(cout).to(device, dtype).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(n, cin, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    residual = None
    if with_residual:
        oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        residual = torch.randn(n, cout, oh, ow, device=device, dtype=dtype)
    out = conv_bn_act(x, conv, bn, residual, relu=True, backend=backend)
    out.sum().backward()
    expected = conv_bn_act(x.detach(), conv, bn, residual, relu=True, backend="reference")
    return relative_error(out, expected)


def _graph_case(backend: str, device: torch.device) -> float:
    """Relative error of a CUDA-graph replay of a fused ResNet-18 forward against an eager call on the same input,
    with eager calls on other inputs (and their memory traffic) in between the replays."""
    torch.manual_seed(0)
    model = models.resnet18(backend=backend).to(device, torch.bfloat16, memory_format=torch.channels_last).eval()
    static = torch.randn(2, 3, 64, 64, device=device, dtype=torch.bfloat16)
    static = static.contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(2):  # outside the capture: compilation, algorithm choice, the fold caches
                model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        for _ in range(3):
            model(torch.randn_like(static))
            graph.replay()
        expected = model(static.clone())
    torch.cuda.synchronize()
    return relative_error(out, expected)


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [b for b in DEVICE_BACKENDS[device.type] if backends.unavailable_reason(b) is None]
    print(f"device {device}, backends {names or 'none besides reference'}")
    # (label, backend, the cuda backend's engine): where the Hopper engine (CUTLASS sm90 convs) runs, "cuda" is on
    # it by default, and the other engines run as well.
    variants = [(b, b, None) for b in ["reference", *names]]
    failures = 0
    if "cuda" in names and hopper_engine_runs(device):
        for engine in other_cuda_engines():
            why = engine_unfit(engine)
            if why:  # a case that hangs would stall the sanitizer's stage
                print(f"BAD cuda+{engine}: not run: {why}")
                failures += 1
            else:
                variants.append((f"cuda+{engine}", "cuda", engine))
    for label, backend, engine in variants:
        with engine_scope(engine):
            failures += _check_backend(label, backend, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("FAILED" if failures else "all cases ok")
    return 1 if failures else 0


def _check_backend(label: str, backend: str, device: torch.device) -> int:
    """Runs every case on one backend, prints a line per case; returns the number of failures."""
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        tol = forward_rtol(dtype, device)
        for shape in SHAPES:
            try:
                err = _case(shape, backend, device, dtype)
                ok = err <= tol
            except Exception as exc:  # report every case, then fail
                err, ok = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], False
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {label:9s} {str(dtype):15s} {shape}: rel err {err} (tol {tol})")
    model = models.resnet18(backend=backend).to(device).train()
    x = torch.randn(2, 3, 64, 64, device=device)
    model(x).sum().backward()
    print(f"ok  {label:9s} resnet18 train step (64x64, batch 2)")
    if device.type == "cuda":
        err = _graph_case(backend, device)
        ok = err <= forward_rtol(torch.bfloat16, device)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {label:9s} resnet18 eval bf16 CUDA-graph replay vs eager: rel err {err}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
