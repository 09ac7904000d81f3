"""Recipes: how a fused unit's output can be made again in backward instead of being kept for it.

A unit's output act(y·scale + shift [+ residual·residual_scale]) is remade from y, which the unit keeps anyway,
per-channel vectors, and its residual: nothing, a tensor, or the recipe of one (a projection block end's residual is its
shortcut's raw conv output, which that unit keeps too, scaled per channel: projection_train.py). Units that would keep
such an output for their backward (the next conv's input, a residual the ReLU mask needs, the stem's max-pool input)
keep its recipe's tensors instead. A side table maps outputs to their recipes (weakly, checked against in-place changes;
writes through `tensor.data` bypass the version counter and are not seen, as for autograd's own saved tensors).

A recipe exists only while it costs nothing: for an output whose unit keeps y for its own backward (the output is
part of a graph), until that unit has run its backward (every unit that saved the recipe has run its own by then;
the recipe then drops its tensors), and never while saved-tensor hooks are active (torch.utils.checkpoint,
save_on_cpu, user hooks): those decide what is kept, and a checkpoint's recomputation must save exactly what its
first forward saved, which a recipe bound to a tensor object would not guarantee.

Block outputs make chains: block k's output is remade from block k-1's, remade from block k-2's, ...; every
KEEP_EVERY-th block output has no recipe and is kept as it is, which bounds the chain. In backward each remade
tensor is made once and waits in its memo until the last unit that needs it has run its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .passes import PASSES


class _Memo:
    """A tensor remade in backward, shared by the backward passes that need it until the last of them has run."""

    __slots__ = ("tensor", "users")

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.users = 0  # backward passes (of units that saved the recipe) yet to run


class Recipe:
    """How a unit's output was made, exactly: PASSES[passes].normalize(y, scale, shift, residual, relu,
    residual_scale), where the residual is None, a tensor, or the recipe of one (a chain through the blocks of a
    stage); a residual scale goes with a tensor residual only."""

    __slots__ = (
        "y", "scale", "shift", "residual", "residual_scale", "relu", "passes", "version", "memo", "length",
        "residual_version",
    )  # fmt: skip

    def __init__(
        self,
        y: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        residual: torch.Tensor | Recipe | None,
        relu: bool,
        passes: str,
        version: int,
        length: int,
        residual_scale: torch.Tensor | None = None,
    ) -> None:
        self.y: torch.Tensor | None = y
        self.scale, self.shift, self.residual, self.residual_scale = scale, shift, residual, residual_scale
        self.relu, self.passes = relu, passes
        self.version = version  # the output's version counter when made: an in-place change since voids the recipe
        self.memo = _Memo()
        self.length = length  # recipes in the chain, this one included
        # A tensor residual changed in place since would remake another output (found by an audit: a partial
        # backward, autograd.grad, then took a wrong weight gradient); inference tensors have no version counter.
        self.residual_version = (
            residual._version if isinstance(residual, torch.Tensor) and not residual.is_inference() else None
        )

    def alive(self) -> bool:
        residual = self.residual
        if isinstance(residual, torch.Tensor):
            return self.y is not None and (self.residual_version is None or residual._version == self.residual_version)
        return self.y is not None and (not isinstance(residual, Recipe) or residual.alive())

    def release(self) -> None:
        """Drops the tensors: the unit that made the output has run its backward."""
        self.y = self.scale = self.shift = self.residual = self.residual_scale = None
        self.memo.tensor = None


class _Spec(NamedTuple):
    """A saved recipe without its tensors (those go through save_for_backward): residual is the nested recipe's
    spec, True for a plain tensor, or None; scaled says whether a residual scale follows shift."""

    relu: bool
    passes: str
    memo: _Memo
    residual: _Spec | bool | None
    scaled: bool = False


# Block outputs are remade from the previous block's output, which is remade from the one before, ...: a chain of
# recipes, cut by keeping every KEEP_EVERY-th block output as it is. Each remade tensor is made once per backward
# (shared through its memo); a longer chain keeps fewer block outputs but holds more of them remade at once in
# backward.
KEEP_EVERY = 4

_RECIPES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def hooks_active() -> bool:
    """Whether saved-tensor hooks are active (then no recipes are made or used)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def record(
    out: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    residual_recipe: Recipe | None,
    relu: bool,
    passes: str,
    residual_scale: torch.Tensor | None = None,
) -> Recipe | None:
    """Records how `out` was made and returns the recipe, for its unit to release after its backward; None (no
    recipe) where remaking it would keep a residual that nothing else keeps (no ReLU: the unit itself did not keep
    it) or the chain would reach KEEP_EVERY recipes."""
    length = 1
    if residual_recipe is not None:
        length = residual_recipe.length + 1
        if length >= KEEP_EVERY:
            return None
        residual = residual_recipe
    elif residual is not None and not relu:
        return None
    recipe = Recipe(y, scale, shift, residual, relu, passes, out._version, length, residual_scale)
    _RECIPES[out] = recipe
    return recipe


def recipe_of(t: torch.Tensor, passes: str | None = None) -> Recipe | None:
    """The recipe that remakes t exactly as it is now (made by the `passes` implementation, if given), or None."""
    recipe = _RECIPES.get(t)
    if recipe is None or recipe.version != t._version or passes not in (None, recipe.passes) or not recipe.alive():
        return None
    return recipe


def saved_form(item: torch.Tensor | Recipe | None) -> tuple[list[torch.Tensor | None], _Spec | None]:
    """The tensors to save for `item` (itself, or its recipe's chain of tensors) and the spec that remakes it;
    each recipe of the chain counts one more backward pass that will use it."""
    if not isinstance(item, Recipe):
        return [item], None
    tensors: list[torch.Tensor | None] = [item.y, item.scale, item.shift]
    scaled = item.residual_scale is not None
    if scaled:
        tensors.append(item.residual_scale)
    residual: _Spec | bool | None = None
    if item.residual is not None:
        nested, nested_spec = saved_form(item.residual)
        tensors += nested
        residual = True if nested_spec is None else nested_spec
    item.memo.users += 1
    return tensors, _Spec(item.relu, item.passes, item.memo, residual, scaled)


def remade(saved: tuple, spec: _Spec | None) -> torch.Tensor | None:
    """The saved tensor itself (first of `saved`), or the one its recipe's tensors make again (once per backward:
    a tensor that another unit's backward will also need waits in its memo)."""
    if spec is None:
        return saved[0]
    if spec.memo.tensor is not None:
        return spec.memo.tensor
    y, scale, shift, *rest = saved
    residual_scale = rest.pop(0) if spec.scaled else None
    residual = None if spec.residual is None else remade(rest, None if spec.residual is True else spec.residual)
    out = PASSES[spec.passes].normalize(y, scale, shift, residual, spec.relu, residual_scale)
    if spec.memo.users > 1:
        spec.memo.tensor = out
    return out


def release(spec: _Spec | bool | None) -> None:
    while isinstance(spec, _Spec):
        spec.memo.users -= 1
        if spec.memo.users <= 0:
            spec.memo.tensor = None
        spec = spec.residual


@contextlib.contextmanager
def releasing(ctx: Any, *specs: _Spec | bool | None) -> Iterator[None]:
    """Around a unit's backward: when it ends, the unit no longer needs the tensors its saved recipes (`specs`)
    remake, and the recipe of its own output (ctx.made_recipe, where there is one: every user has run) drops its
    tensors."""
    try:
        yield
    finally:
        for spec in specs:
            release(spec)
        made = getattr(ctx, "made_recipe", None)
        if made is not None:
            made.release()
