"""Which implementation runs a fused op: the backend registry and the per-call choice.

PyTorch's dispatcher chooses by device, not by backend, so the choice happens here: `"auto"` takes, per
device, the first backend in `AUTO_ORDER` that is built and supports the configuration; an explicit name
(argument or the FUSED_RESNET_BACKEND environment variable) is obeyed or refused with a clear error.
Falling back to the reference backend happens only where the user allowed it, and is logged.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops.conv_config import ConvConfig

log = logging.getLogger("fused_resnet")

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")

# Fastest first, per device type; reference last as the always-correct path. Update from benchmark results.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_MODULES = {
    "reference": "fused_resnet.ops.reference_backend",
    "triton": "fused_resnet.ops.triton_backend",
    "cuda": "fused_resnet.ops.cpp_backend",
    "cpu": "fused_resnet.ops.cpp_backend",
}

ConvBiasActFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """One implementation of the fused ops.

    conv_bias_act(x, weight, bias, residual, config, relu, in_scale=None, in_shift=None)
        -> act(conv(pre(x), weight) + bias + residual), see ops/reference.py for the exact semantics; weight
        is the BN-folded weight in x's dtype, bias/in_scale/in_shift per-channel float32; autograd-capable.
    unavailable() returns why the backend cannot run at all here (None if it can);
    unsupported(x, weight, residual, config, prologue: bool) why it cannot run this call (None if it can).
    conv_bias_act_into_residual, where a backend has it: the same arguments and result, written into `residual`
    (which it returns) instead of a new tensor; no autograd, for callers whose residual is dead after the call.
    launch, where a backend has it: conv_bias_act without the op's dispatch (no autograd, no fake tensors, no
    argument checks) for eager callers that need no gradient and have checked the operands; the dispatcher's
    layers cost more host time than a kernel of a small layer takes (see nn/functional.py).
    auto_first(x), where a backend has it: True where "auto" should try this backend before AUTO_ORDER's first,
    because it has a faster engine for such inputs here (the cuda backend's Hopper engine).
    """

    name: str
    conv_bias_act: ConvBiasActFn
    unavailable: Callable[[], str | None]
    unsupported: Callable[..., str | None]
    conv_bias_act_into_residual: ConvBiasActFn | None = None
    launch: ConvBiasActFn | None = None
    auto_first: Callable[[torch.Tensor], bool] | None = None


class BackendError(RuntimeError):
    """A requested backend cannot run the requested configuration."""


@torch.compiler.assume_constant_result
def requested_backend(backend: str) -> str:
    """Applies the FUSED_RESNET_BACKEND override to `"auto"` and checks the name."""
    if backend == "auto":
        backend = os.environ.get("FUSED_RESNET_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}")
    return backend


def fallback_allowed(allow_fallback: bool | None) -> bool:
    if allow_fallback is not None:
        return allow_fallback
    return os.environ.get("FUSED_RESNET_ALLOW_FALLBACK", "0") not in ("", "0", "false", "False")


_LOADED: dict[str, Backend | str] = {}


def load_backends() -> None:
    """Imports every backend module once, eagerly: torch.compile must not trace imports."""
    for name, module_name in _MODULES.items():
        if name in _LOADED:
            continue
        try:
            _LOADED[name] = importlib.import_module(module_name).backend(name)
        except ImportError as err:  # an optional dependency (triton, the extension) is missing
            _LOADED[name] = f"cannot import {module_name}: {err}"


def get_backend(name: str) -> Backend:
    """The Backend entry for `name` (for "cuda"/"cpu", the extension's entry for that device)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKEND_NAMES))}")
    load_backends()
    entry = _LOADED[name]
    if isinstance(entry, str):
        raise BackendError(f"backend {name!r} is not available: {entry}")
    return entry


def loaded(name: str) -> Backend | str | None:
    """The entry load_backends made for `name` (a Backend, or why it could not load), None before it ran."""
    return _LOADED.get(name)


@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run at all in this process (None if it can)."""
    load_backends()
    entry = _LOADED[name]
    return entry if isinstance(entry, str) else entry.unavailable()


def available_backends() -> list[str]:
    return [name for name in BACKEND_NAMES if unavailable_reason(name) is None]


def _why_not(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
    prologue: bool,
) -> str | None:
    if name in ("cuda", "cpu") and x.device.type != name:
        return f"the {name!r} backend runs {name} tensors, got a tensor on {x.device}"
    reason = unavailable_reason(name)
    if reason is not None:
        return reason
    return get_backend(name).unsupported(x, weight, residual, config, prologue)


def auto_order(x: torch.Tensor) -> tuple[str, ...]:
    """The backends "auto" tries for x, in order: AUTO_ORDER for x's device, with a backend whose auto_first(x)
    holds moved to the front."""
    order = AUTO_ORDER.get(x.device.type, ("reference",))
    for candidate in order:
        if unavailable_reason(candidate) is None:
            first = get_backend(candidate).auto_first
            if first is not None and first(x):
                return (candidate, *(n for n in order if n != candidate))
    return order


def select(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    config: ConvConfig,
    prologue: bool = False,
    allow_fallback: bool | None = None,
) -> Backend:
    """The backend that runs this call, or a BackendError saying why none may."""
    name = requested_backend(backend)
    if name == "auto":
        reasons = []
        for candidate in auto_order(x):
            why = _why_not(candidate, x, weight, residual, config, prologue)
            if why is None:
                return get_backend(candidate)
            reasons.append(f"{candidate}: {why}")
        raise BackendError(f"no backend supports this call on {x.device}: " + "; ".join(reasons))
    why = _why_not(name, x, weight, residual, config, prologue)
    if why is None:
        return get_backend(name)
    if fallback_allowed(allow_fallback):
        _warn_fallback(name, why)
        return get_backend("reference")
    raise BackendError(
        f"backend {name!r} cannot run this call: {why}. Use backend='auto', or allow the reference fallback "
        "with allow_fallback=True / FUSED_RESNET_ALLOW_FALLBACK=1."
    )


@functools.cache
def _warn_fallback(name: str, why: str) -> None:
    log.warning("backend %r cannot run a call (%s); using the reference backend as allowed", name, why)
