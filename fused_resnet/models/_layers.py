"""ResidualLayer: the stage container of every fused ResNet, and the rule for when a block may reuse its input;
StemMaxPool2d: the stem's max-pool, which in training remakes its input in backward instead of keeping it.

A block's output becomes its residual add's result; when the residual is the block's input x (an identity
shortcut) and nothing else will read x again, the last conv can write its result into x's memory (oneDNN's "sum"
post-op on CPU): no new buffer, and the residual is read and written in one place. Whether x is dead is known only
by the caller, so the layer tells each block: x is dead when it is the previous fused block's output (a tensor
that block made) and no forward hook can have kept a reference to it.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import _symbolic_trace
from torch.nn.modules import module as _module

from ..nn.hooks import has_hooks, submodules
from ..training.max_pool_train import max_pool_train

# fx.symbolic_trace only (torch.export and torch.compile never write in place: nn/functional.py); newer torch
# names it apart from is_fx_tracing, which also answers for torch.export and logs a warning saying so.
fx_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)


class ResidualLayer(nn.Sequential):
    """nn.Sequential of residual blocks (same children and state_dict keys) that passes `donate_x=True` to a
    block whose input is the previous fused block's output and invisible to hooks."""

    def forward(self, x: Tensor) -> Tensor:
        # A symbolic trace would record the donation and replay it where the graph may return the tensor.
        if fx_symbolic_tracing() or _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return super().forward(x)
        # A hook that sees the tensor may keep it: forward hooks on the previous block (its output), any on the
        # modules inside it (its relu's, which hooks make run itself: activation capture for Grad-CAM; an in-place
        # relu's input is its output), any on this block or inside it (its input: a pre-hook on its first conv).
        previous_kept = True  # the stage's input: the caller's
        for block in self:
            kept = not _donates(block) or _hooked_inside(block)
            sees_input = block._forward_pre_hooks or block._forward_hooks
            x = block(x) if previous_kept or kept or sees_input else block(x, donate_x=True)
            previous_kept = kept or bool(block._forward_hooks)
        return x


def _donates(module: nn.Module | None) -> bool:
    # Only the package's own block classes, with their own forward: a subclass, or a forward set on the instance
    # (monkeypatched), may keep its output or have another signature.
    return module is not None and "takes_donated_input" in type(module).__dict__ and "forward" not in module.__dict__


def _hooked_inside(block: nn.Module) -> bool:
    return any(has_hooks(m) for m in submodules(block)[1:])


class StemMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (same arguments, no state) that in training keeps neither its input nor the argmax indices
    for backward where its input is a fused unit's output: backward remakes the input and pools it again
    (training/max_pool_train.py)."""

    def forward(self, x: Tensor) -> Tensor:
        out = None if fx_symbolic_tracing() else max_pool_train(self, x)
        return super().forward(x) if out is None else out
