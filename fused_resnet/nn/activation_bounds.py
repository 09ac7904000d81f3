"""Bounds on the magnitude of a fused model's activations within one CPU forward, which let the CPU convs' NaN
scans stay off (csrc/cpu/input_scans.h) without a NaN turning into 0 unseen.

oneDNN's ReLU post-op makes NaN 0, so the CPU conv scans its inputs for NaN and infinities unless it is known that
they hold none. A fused model's forward (models/_common.py: forward_checked) reads its input once; the extension checks
the parameters where it packs them. What is left is overflow: finite activations whose conv sums pass the fp32 range
(a diverged checkpoint; an input of 1e30) make infinities, then NaN, mid-network, which an audit found turned into
finite logits. So while the scans are off each fused conv call bounds its output from bounds of its inputs,

    |out| <= gain · (s·|x|max + t) + |bias|max + |residual|max,

gain being the folded weight's largest absolute row sum (kept with the conv's cached fold) and s, t the largest absolute
prologue scale and shift (1 and 0 without one): every value and every partial sum of its accumulation stays within
it. A tensor the bounds do not know (the model's input, a max-pool's output) has its largest magnitude read, one pass,
as do inputs whose bound has grown past LIMIT (bounds compound over the layers, actual values rarely do); where even
that bound is past LIMIT, the scans go back on for the rest of the forward. LIMIT is 2^100 (about 1.3e30): rounding
moves a computed sum off its bound by a relative 1e-5 at most, so nothing within it can overflow fp32's 3.4e38.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn

from .folding import derived_from_fold

LIMIT = 2.0**100

_local = threading.local()

# A forward's bounds: id(tensor) -> (weak reference to it, bound, whether read from the tensor itself). An entry
# whose reference no longer gives that tensor (freed; its id reused) is no entry. Cheaper than a WeakIdKeyDictionary
# (17 µs a store, 0.9 ms of a ResNet-50 forward).
Bounds = dict[int, tuple[weakref.ref, float, bool]]


def largest_magnitude(t: torch.Tensor) -> float:
    """max |t| (NaN where t holds NaN, inf where an infinity), reading t once."""
    if t.numel() == 0:
        return 0.0
    t = t.detach()  # an eval forward with autograd on: no graph, and no warning when made a float
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        t = t.as_strided((t.numel(),), (1,))  # its values fill numel slots: read as 1-D, channels_last 7x as fast
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


def begin(x: torch.Tensor, bound: float) -> Bounds | None:
    """Starts this thread's bounds for a forward whose input x has largest magnitude `bound`; returns what was there
    (for end())."""
    previous = getattr(_local, "bounds", None)
    _local.bounds = {id(x): (weakref.ref(x), bound, True)}
    return previous


def end(previous: Bounds | None) -> None:
    _local.bounds = previous


def active() -> bool:
    """Whether this thread's CPU convs are running with the scans off under bounds."""
    return getattr(_local, "bounds", None) is not None


def stop() -> None:
    """The scans are back on for the rest of this forward: no more bounds are kept."""
    _local.bounds = None


def _gain(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """(largest absolute row sum of the folded weight, largest absolute bias), kept with conv's cached fold."""
    kept = derived_from_fold(conv, weight)
    gain = kept.get("gain") if kept is not None else None
    if gain is None:
        rows = weight.detach().abs().sum(dim=(1, 2, 3), dtype=torch.float64)
        gain = (float(rows.max()) if rows.numel() else 0.0, largest_magnitude(bias))
        if kept is not None:
            kept["gain"] = gain
    return gain


def _bound_of(t: torch.Tensor, bounds: Bounds) -> tuple[float, bool]:
    """(bound, whether it was read from the tensor itself) for t; a read is kept for the next call that takes t (a
    block's input feeds its first conv and its shortcut)."""
    known = bounds.get(id(t))
    if known is not None and known[0]() is t:
        return known[1], known[2]
    return _read(t, bounds), True


def _read(t: torch.Tensor, bounds: Bounds) -> float:
    """t's largest magnitude, read and kept as its bound."""
    bound = largest_magnitude(t)
    bounds[id(t)] = (weakref.ref(t), bound, True)
    return bound


def output_bound(
    x: torch.Tensor,
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
) -> float | None:
    """A bound on the output of conv_bias_act(x, weight, bias, residual, prologue in_scale/in_shift), conv's folded
    call, and on every sum it makes, within LIMIT; None where there is none (an input or parameter is not finite, or
    the values may be too large): the caller then turns the scans on."""
    bounds = _local.bounds
    gain, bias_max = _gain(conv, weight, bias)
    scale = shift = None
    if in_scale is not None:
        scale, shift = largest_magnitude(in_scale), largest_magnitude(in_shift)

    def of(x_bound: float, r_bound: float) -> float:
        if scale is not None:
            x_bound = scale * x_bound + shift
        return gain * x_bound + bias_max + r_bound

    x_bound, x_exact = _bound_of(x, bounds)
    r_bound, r_exact = _bound_of(residual, bounds) if residual is not None else (0.0, True)
    out = of(x_bound, r_bound)
    if not out <= LIMIT and not (x_exact and r_exact):  # compounded bounds: read the inputs' own largest values
        x_bound = x_bound if x_exact else _read(x, bounds)
        r_bound = r_bound if r_exact else _read(residual, bounds)
        out = of(x_bound, r_bound)
    return out if out <= LIMIT and math.isfinite(out) else None


def record(out: torch.Tensor, bound: float) -> None:
    """out's bound, for the calls that take it as an input."""
    bounds = getattr(_local, "bounds", None)
    if bounds is not None:
        bounds[id(out)] = (weakref.ref(out), bound, False)
