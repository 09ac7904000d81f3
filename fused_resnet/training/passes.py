"""The elementwise and reduction passes of the training path, one interface with three implementations.

"torch" runs PyTorch ops (torch_passes.py: any device, dtype and layout); "cpp" the extension's CPU and CUDA
kernels (cpp_passes.py, channels_last); "triton" the kernels of triton_passes.py (CUDA, or CPU under the Triton
interpreter). The autograd Function (conv_bn_act_train.py) names one and calls:

  stats(y)                                                -> BatchStats, merged per channel
  normalize(y, scale, shift, residual, relu, rs)          -> act(y·scale + shift [+ residual·rs]) in y's dtype
  grad_sums(g, y, scale, shift, residual, mean, relu, store_masked, rs)
                                                          -> (Σg', Σg'·(y − mean), g' or None)
  grad_input(g, y, scale, shift, residual, a, b, c, relu, rs) -> a·g' + b·y + c in y's dtype and layout

with g' = g·1[y·scale + shift [+ residual·rs] > 0] where relu (else g), per-channel vectors in the accumulation
dtype. rs, the residual's per-channel scale (residual_scale, last and optional: None multiplies by nothing), lets
a block end take its projection shortcut's raw conv output as the residual, that shortcut's BN shift folded into
`shift` (projection_train.py). grad_sums returns g' when store_masked asks for it (the shortcut's gradient); an
implementation that materializes it anyway returns it always, and then grad_input is called with g' itself
(relu=False, no residual) instead of recomputing the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import backends
from . import torch_passes
from .stats import BatchStats

log = logging.getLogger("fused_resnet")


@dataclass(frozen=True)
class Passes:
    stats: Callable[[torch.Tensor], BatchStats]
    normalize: Callable[..., torch.Tensor]
    grad_sums: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    grad_input: Callable[..., torch.Tensor]
    unsupported: Callable[[str, torch.dtype], str | None]


def _runs_anything(device_type: str, dtype: torch.dtype) -> str | None:
    return None


PASSES: dict[str, Passes] = {
    "torch": Passes(
        torch_passes.batch_stats,
        torch_passes.normalize,
        torch_passes.grad_sums,
        torch_passes.grad_input,
        _runs_anything,
    ),
}
_MISSING: dict[str, str] = {}
try:
    from . import triton_passes
except ImportError as err:  # triton is optional
    _MISSING["triton"] = f"cannot import triton: {err}"
else:
    PASSES["triton"] = Passes(
        triton_passes.batch_stats,
        triton_passes.normalize,
        triton_passes.grad_sums,
        triton_passes.grad_input,
        triton_passes.unsupported,
    )
from . import cpp_passes  # noqa: E402  (needs torch_passes, imported above)

PASSES["cpp"] = Passes(
    cpp_passes.batch_stats, cpp_passes.normalize, cpp_passes.grad_sums, cpp_passes.grad_input, cpp_passes.unsupported
)

# The passes each backend trains with: its own kernels where it has them, else PyTorch ops.
_BACKEND_PASSES = {"triton": "triton", "cpu": "cpp", "cuda": "cpp"}
# "auto": the first of these that runs, per device. On CUDA the extension's passes first: with them a ResNet-50
# train step (H200, bf16 autocast, batch 256) took 84 ms against 140 ms with the Triton passes, whose launches
# cost more host time (benchmarks/results/2026-11-26_H200_check2).
_AUTO_PASSES = {"cuda": ("cpp", "triton"), "cpu": ("cpp",)}
_BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda"}  # the extension's backends run one device type each


@torch.compiler.assume_constant_result
def _unsupported(passes: str, device_type: str, dtype: torch.dtype) -> str | None:
    if passes not in PASSES:
        return _MISSING[passes]
    return PASSES[passes].unsupported(device_type, dtype)


def passes_for(backend: str, x: torch.Tensor, allow_fallback: bool | None = None) -> str:
    """Which passes train on `backend` for x: the backend's own kernels ("triton"; "cpp", the extension's, for
    "cpu" and "cuda"), on "auto" those of x's device where they run, else PyTorch ops."""
    name = backends.requested_backend(backend)
    if name == "auto":
        runs = (p for p in _AUTO_PASSES.get(x.device.type, ()) if _unsupported(p, x.device.type, x.dtype) is None)
        return next(runs, "torch")
    wanted = _BACKEND_PASSES.get(name)
    if wanted is None:
        return "torch"
    device_type = _BACKEND_DEVICE.get(name, x.device.type)
    if x.device.type != device_type:
        reason = f"the {name!r} backend runs {device_type} tensors, got a tensor on {x.device}"
    else:
        reason = _unsupported(wanted, x.device.type, x.dtype)
    if reason is None:
        return wanted
    if not backends.fallback_allowed(allow_fallback):
        raise backends.BackendError(f"the {name!r} backend cannot train here: {reason}")
    log.info("training on PyTorch ops instead of the %r backend: %s", name, reason)
    return "torch"
