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


def submodules(module: nn.Module) -> list[nn.Module]:
    """module and every module inside it, each once: the modules module.modules() yields (in another order), listed
    without its chain of generators, which costs ~1.5 µs a module: the per-forward checks over a whole model
    (models/_common.py, models/_layers.py) walk ~150 modules in a ResNet-50."""
    found = [module]
    seen = {id(module)}
    for parent in found:  # grows while it is walked: breadth first
        for child in parent._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found
