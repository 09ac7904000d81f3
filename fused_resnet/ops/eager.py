"""When an eager call may run a custom op's implementation directly instead of through the op's dispatch."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def plain_eager_call(x: torch.Tensor) -> bool:
    """True for an eager call without autograd whose operands are plain tensors and which nothing observes.

    The dispatch of a Python-defined op (autograd and fake-tensor layers, argument checks) cost ~30-40 µs of host
    time per call on the CI machine, more than the kernel of a small layer takes on a GPU. Anything that must see
    the op keeps it: autograd, torch.compile, export and TorchScript tracing, tensor subclasses and dispatch modes
    (fake tensors, FlopCounterMode), and the profiler (whose trace names the op).
    """
    return (
        not torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and not torch.autograd._profiler_enabled()
    )
