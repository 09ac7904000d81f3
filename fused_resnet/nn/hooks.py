"""Whether module hooks are registered: a fused call runs the modules' own forwards where hooks expect to see them."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def has_hooks(module: nn.Module | None) -> bool:
    """Whether the module has hooks of its own (forward, forward pre-, backward or backward pre-hooks)."""
    return module is not None and bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


def global_forward_hooks() -> bool:
    """Whether global module forward (or forward pre-) hooks are registered: they expect every module to run."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
