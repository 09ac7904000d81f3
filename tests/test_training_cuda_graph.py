"""A fused train step (forward, loss, backward) captured in a CUDA graph and replayed on new inputs gives what the
same step gives run eagerly: nothing in the fused training path syncs with the host, allocates outside the
caching allocator or keeps Python state that a replay would skip (the bench times such replays with
--graph-replays). GPU only.

Tolerances: both runs use the same kernels on the same data, but cuDNN's weight gradient may sum in another order
from run to run (atomics): fp32 gradients within 1e-4 relative to their scale, with TF32 off.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fused_resnet
from fused_resnet import backends


def _step(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(net(x), target)
    loss.backward()
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_train_step_replays_in_a_cuda_graph(backend):
    if not torch.cuda.is_available() or backends.unavailable_reason(backend) is not None:
        pytest.skip(backends.unavailable_reason(backend) or "needs a CUDA device")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        stock = torchvision.models.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last).train()
        graphed, eager = fused_resnet.fuse(stock, backend=backend), fused_resnet.fuse(stock, backend=backend)
        shape = (8, 3, 64, 64)
        x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (8,), device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # outside the capture: Triton compiles, cuDNN picks its algorithms
            for _ in range(2):
                _step(graphed, x, target)
        torch.cuda.current_stream().wait_stream(side)
        graphed.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = _step(graphed, x, target)
        for _ in range(2):
            new = torch.randn(shape, device="cuda")
            x.copy_(new)
            graph.replay()
            eager.zero_grad(set_to_none=True)
            want = _step(eager, new.contiguous(memory_format=torch.channels_last), target)
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
            for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
                scale = q.grad.abs().max().item()
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
