"""The elementwise and reduction passes of the training path, one interface with two implementations.

"torch" runs PyTorch ops (any device, any dtype); "triton" runs the kernels of triton_passes.py (CUDA, or CPU
under the Triton interpreter). The autograd Function (conv_bn_act_train.py) names one and calls:

  stats(y)                                               -> BatchStats, merged per channel
  normalize(y, scale, shift, residual, relu)             -> act(y·scale + shift [+ residual]) in y's dtype
  grad_sums(g, y, scale, shift, residual, mean, relu, store_masked)
                                                         -> (Σg', Σg'·(y − mean), g' or None)
  grad_input(g, y, scale, shift, residual, a, b, c, relu) -> a·g' + b·y + c in y's dtype

with g' = g·1[y·scale + shift [+ residual] > 0] where relu (else g), per-channel vectors in the accumulation
dtype. grad_sums returns g' when store_masked asks for it (the shortcut's gradient); an implementation that
materializes it anyway returns it always, and then grad_input is called with g' itself (relu=False, no
residual) instead of recomputing the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import backends
from .stats import BatchStats, batch_stats

log = logging.getLogger("fused_resnet")


@dataclass(frozen=True)
class Passes:
    stats: Callable[[torch.Tensor], BatchStats]
    normalize: Callable[..., torch.Tensor]
    grad_sums: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    grad_input: Callable[..., torch.Tensor]
    unsupported: Callable[[str, torch.dtype], str | None]


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _pre_activation(
    y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    # In the accumulation dtype; forward's output and backward's mask both come from here, bit-identical.
    z = torch.addcmul(_channel(shift), y, _channel(scale))
    return z if residual is None else z + residual


def _normalize(
    y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    z = _pre_activation(y, scale, shift, residual)
    return (torch.relu(z) if relu else z).to(y.dtype)


def _grad_sums(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    relu: bool,
    store_masked: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if relu:
        g = torch.where(_pre_activation(y, scale, shift, residual) > 0, g, 0)
    acc, dims = mean.dtype, (0, 2, 3)
    sum_g = g.sum(dims, dtype=acc)
    sum_gy = (g.to(acc) * (y.to(acc) - _channel(mean))).sum(dims)
    return sum_g, sum_gy, g


def _grad_input(
    g: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
) -> torch.Tensor:
    if relu:
        g = torch.where(_pre_activation(y, scale, shift, residual) > 0, g, 0)
    return (torch.addcmul(_channel(c), g.to(a.dtype), _channel(a)) + y.to(a.dtype) * _channel(b)).to(y.dtype)


PASSES: dict[str, Passes] = {
    "torch": Passes(batch_stats, _normalize, _grad_sums, _grad_input, lambda device_type, dtype: None),
}
_TRITON_MISSING = ""
try:
    from . import triton_passes
except ImportError as err:  # triton is optional
    _TRITON_MISSING = f"cannot import triton: {err}"
else:
    PASSES["triton"] = Passes(
        triton_passes.batch_stats,
        triton_passes.bn_normalize,
        triton_passes.grad_sums,
        triton_passes.bn_grad_input,
        triton_passes.unsupported,
    )


@torch.compiler.assume_constant_result
def _triton_unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    if "triton" not in PASSES:
        return _TRITON_MISSING
    return PASSES["triton"].unsupported(device_type, dtype)


def passes_for(backend: str, x: torch.Tensor, allow_fallback: bool | None = None) -> str:
    """Which passes train on `backend` for x: Triton kernels for "triton" (and "auto" on CUDA), else PyTorch ops.

    The "cuda" and "cpu" backends have no training kernels of their own yet: they run the PyTorch passes.
    """
    name = backends.requested_backend(backend)
    if name not in ("triton", "auto"):
        return "torch"
    reason = _triton_unsupported(x.device.type, x.dtype)
    if reason is None and (name == "triton" or x.device.type == "cuda"):
        return "triton"
    if name == "triton":
        if not backends.fallback_allowed(allow_fallback):
            raise backends.BackendError(f"the 'triton' backend cannot train here: {reason}")
        log.info("training on PyTorch ops instead of the 'triton' backend: %s", reason)
    return "torch"
