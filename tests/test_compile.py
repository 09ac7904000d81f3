"""torch.compile(fullgraph=True) over fused models: no graph breaks, same results (aot_eager on CPU CI;
Inductor in the GPU check)."""

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import backends
from fused_resnet.check import randomize_bn_
from fused_resnet.tolerances import relative_error

CPU_BACKENDS = [b for b in ("reference", "cpu") if backends.unavailable_reason(b) is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_eval_and_train(backend):
    torch._dynamo.reset()
    model = randomize_bn_(fused_resnet.resnet18(num_classes=10, backend=backend))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= 1e-6
    model.train()
    eager = copy.deepcopy(model)
    xg, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    eager(xe).sum().backward()
    assert relative_error(xg.grad, xe.grad) <= 1e-4
    # The running-stat update (a side effect) happens once per call, compiled or not.
    for (name, a), b in zip(model.named_buffers(), eager.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.gpu
def test_inductor_on_gpu():
    torch._dynamo.reset()
    model = randomize_bn_(fused_resnet.resnet50()).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(backend):
    model = randomize_bn_(fused_resnet.resnet18(backend=backend)).cuda().eval().half()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        model(x)  # warm-up: fold caches, autotuning, lazy init all happen outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, model(x)) <= 1e-3
