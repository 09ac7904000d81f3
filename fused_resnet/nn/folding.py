"""BatchNorm folding for eval mode: W' = W·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε), computed in fp32.

Folding in bf16/fp16 measurably hurts accuracy, so the fold runs in fp32 (fp64 for fp64 models); W' is then
cast to the compute dtype and b' stays fp32. The result is cached on the conv module, keyed on the
parameters' identity, version counters, storage and dtype, so load_state_dict, an optimizer step, .to() or a
replaced parameter invalidates it; tensors a module makes at each access (parametrizations) are folded at each call.
The key holds BN's num_batches_tracked too: a train-mode forward of the BN module itself (stock BN recalibration)
moves the running statistics inside ATen's kernel, which bumps no version counter, but counts the batch in place.
The cache is never pickled or deep-copied (torch.save of a model would store every fold beside the weights).
The cache holds the tensors it folded (and so their memory) until the next call refolds: a new tensor can then never
take a folded one's address. Writes through `tensor.data` bump no version counter and are not seen, as for autograd's
own saved-tensor checks: after such writes (an EMA model updated through `.data`), fused_resnet.clear_caches(model).
Nor are running statistics that ATen's train-mode batch norm moves for another owner (a BN whose buffers are tied to
this one's, a direct F.batch_norm(training=True) on them): only the BN's own num_batches_tracked shows such a move.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import cpp_backend

_CACHE_ATTR = "_fused_resnet_fold_cache"

# The norms whose eval forward is the affine of their running statistics that bn_scale_shift computes. Any other
# (a BatchNorm2d subclass, which may override forward, a norm of another kind) runs its own forward instead.
try:  # torchvision is optional
    from torchvision.ops.misc import FrozenBatchNorm2d

    FOLDABLE_NORMS: tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
except ImportError:
    FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm2d/FrozenBatchNorm2d, in fp32 (fp64 stays fp64)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift


def fold_conv_bn(
    conv_weight: torch.Tensor, bn: nn.Module | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight in `dtype`, channels_last; bias in fp32) of conv → eval BN; differentiable.
    bn=None (a conv with no BN after it): the weight cast and repacked, a zero bias."""
    if bn is None:
        bias = torch.zeros(conv_weight.shape[0], dtype=torch.float32, device=conv_weight.device)
        # A copy even where the parameter already has this dtype and layout: the fold is the package's own tensor,
        # which the CPU backend may prepack and keep (allow_prepacking), never the user's parameter.
        return conv_weight.to(dtype, copy=True, memory_format=torch.channels_last), bias
    scale, shift = bn_scale_shift(bn)
    weight = (conv_weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype)
    return weight.contiguous(memory_format=torch.channels_last), shift


# (module class, name) -> whether the class itself defines no attribute of that name, so that the module's own
# parameter and buffer dicts answer getattr: a parametrized module's class defines its weight as a property.
_PLAIN_NAMES: dict[tuple[type, str], bool] = {}


def _lookup(module: nn.Module, name: str) -> tuple[torch.Tensor | None, bool]:
    """(getattr(module, name, None), whether that is one of the module's own parameters or buffers). Read from the
    module's dicts where that gives the same: nn.Module's attribute fallback costs ~0.7 µs of host time a lookup (CI
    machine), and every fused eval call made a dozen of them."""
    kind = type(module)
    plain = _PLAIN_NAMES.get((kind, name))
    if plain is None:
        plain = _PLAIN_NAMES[(kind, name)] = not hasattr(kind, name)
    if plain:
        tensor = module._parameters.get(name)
        if tensor is None:
            tensor = module._buffers.get(name)
        if tensor is not None:
            return tensor, True
    # A property (parametrizations) or an instance attribute (torch.nn.utils.weight_norm sets one before each
    # forward): a tensor made anew at each access, or None.
    return getattr(module, name, None), False


def module_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """getattr(module, name, None), for a parameter or buffer (see _lookup)."""
    if torch.compiler.is_compiling():  # Dynamo traces getattr itself (and guards on it)
        return getattr(module, name, None)
    return _lookup(module, name)[0]


_BN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# One tensor a cached fold was made from, as fold_sources records it: the module, the name, the tensor (None: the
# module had none of that name) and the tensor's version counter, data pointer and dtype then.
Source = tuple[nn.Module, str, torch.Tensor | None, int, int, torch.dtype | None]


def fold_sources(conv: nn.Conv2d, bn: nn.Module | None, weight: torch.Tensor) -> tuple[Source, ...] | None:
    """What conv's cached fold (whose weight is `weight`) was made from, for fold_current's quick check; None where
    there is no such fold or a tensor it read is no parameter or buffer of the modules (then nothing is cached)."""
    cached = conv.__dict__.get(_CACHE_ATTR)
    if cached is None or cached[3][0] is not weight:
        return None
    return _sources(((conv, ("weight",)), (bn, _BN_NAMES if bn is not None else ())))


def norm_sources(bn: nn.Module) -> tuple[Source, ...] | None:
    """What bn_scale_shift(bn) reads (an eval-mode norm's per-channel affine: a pre-activation prologue), in
    fold_sources' form; None where a change could go unseen (see _tensors: no num_batches_tracked) or a tensor is no
    parameter or buffer of bn's."""
    if isinstance(bn, _BatchNorm) and bn.running_mean is not None and bn.num_batches_tracked is None:
        return None
    return _sources(((bn, _BN_NAMES),))


def _sources(parts: tuple[tuple[nn.Module, tuple[str, ...]], ...]) -> tuple[Source, ...] | None:
    sources = []
    for module, names in parts:
        for name in names:
            tensor, own = _lookup(module, name)
            if tensor is None:
                if name in module.__dict__ or not _PLAIN_NAMES[(type(module), name)]:
                    return None
                sources.append((module, name, None, 0, 0, None))
            elif not own or tensor.is_inference():  # an inference tensor has no version counter
                return None
            else:
                sources.append((module, name, tensor, tensor._version, tensor.data_ptr(), tensor.dtype))
    return tuple(sources)


def fold_current(sources: tuple[Source, ...]) -> bool:
    """Whether a fold made from `sources` (fold_sources) is still what folding them would give: each module still
    has the same tensor (or none) under each name, unchanged since (version counter, storage, dtype). Writes through
    `tensor.data` are not seen, as for the cache itself (see the module's docstring)."""
    for module, name, tensor, version, ptr, dtype in sources:
        found = module._parameters.get(name)
        if found is None:
            found = module._buffers.get(name)
        if found is not tensor:
            return False
        if tensor is not None and (tensor._version != version or tensor.data_ptr() != ptr or tensor.dtype != dtype):
            return False
        if tensor is None and name in module.__dict__:
            return False
    return True


def _tensors(conv: nn.Conv2d, bn: nn.Module | None) -> tuple[list[torch.Tensor], bool]:
    """The tensors the fold reads, and whether each is one the modules store (else a fold of them must not be
    cached: a tensor made at each access has version 0 and, once freed, its address may come back for the next
    one, so the cache key would match a fold of other values)."""
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") if bn is not None else ()
    weight, stored = _lookup(conv, "weight")
    tensors = [weight]
    for name in names:
        tensor, own = _lookup(bn, name)
        if tensor is not None:
            tensors.append(tensor)
            stored = stored and own
    if isinstance(bn, _BatchNorm) and bn.running_mean is not None and bn.num_batches_tracked is None:
        # A train-mode forward of the BN module itself moves its running statistics inside ATen's kernel, which bumps
        # no version counter; only num_batches_tracked (in the key) shows it, and this BN has none (found by audit).
        stored = False
    return tensors, stored


def _cache_key(tensors: list[torch.Tensor], bn: nn.Module | None, dtype: torch.dtype) -> tuple | None:
    try:
        state = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter: never cache them
        return None
    return (dtype, None if bn is None else float(bn.eps), state)


def _same_objects(held: tuple[torch.Tensor, ...], tensors: list[torch.Tensor]) -> bool:
    # The key's addresses and version counters alone would match a new tensor made where a freed one was, with its
    # version counter at 0 again (a parameter replaced by another, twice between two calls or after a `del`).
    return len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors, strict=True))


def _dropped() -> None:
    return None


class _FoldEntry(tuple):
    """(key, the tensors folded, detached aliases of their storages, (weight, bias), a dict for what is derived from
    the fold (activation_bounds' gain)): a cache entry, which pickles (torch.save, copy.deepcopy) as None, a cache
    miss."""

    def __reduce__(self) -> tuple:
        return _dropped, ()


def folded_conv_bn(conv: nn.Conv2d, bn: nn.Module | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_conv_bn, cached when no gradient is wanted (a cached tensor must not carry autograd history)."""
    # Under torch.compile the fold is traced into the graph (and constant-folded with freezing); so it is under
    # torch.jit.trace, whose graph would otherwise keep a cached fold as a constant that later weights never reach.
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return fold_conv_bn(conv.weight, bn, dtype)
    tensors, stored = _tensors(conv, bn)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fold_conv_bn(tensors[0], bn, dtype)
    key = _cache_key(tensors, bn, dtype) if stored else None
    cached = conv.__dict__.get(_CACHE_ATTR)
    if key is not None and cached is not None and cached[0] == key and _same_objects(cached[1], tensors):
        weight, bias = cached[3]
        # A fold made inside inference_mode is an inference tensor, unusable outside it.
        if torch.is_inference_mode_enabled() or not weight.is_inference():
            return weight, bias
    # Folded outside inference mode (when the parameters allow it) so that the result is an ordinary tensor:
    # usable later outside inference_mode, and cacheable by backends that key on version counters (the CPU
    # backend's prepacked oneDNN weights).
    with torch.inference_mode(tensors[0].is_inference()), torch.no_grad():
        folded = fold_conv_bn(tensors[0], bn, dtype)
    if key is not None:
        # Held: the tensors (identity) and their storages as they were (`.data =` swaps a parameter's storage while
        # the object stays), so that no new tensor can be made at a folded one's address while this entry lives.
        # Strong references, not weak ones: torch.utils.swap_tensors (module.to() in swap mode) refuses tensors
        # with weak references.
        entry = (key, tuple(tensors), tuple(t.detach() for t in tensors), folded, {})
        conv.__dict__[_CACHE_ATTR] = _FoldEntry(entry)
        cpp_backend.allow_prepacking(folded[0])  # kept: the CPU backend may keep its oneDNN-layout copy
    return folded


def cached_fold(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (weight, bias) fold cached on conv, if any (for tests and tools)."""
    cached = conv.__dict__.get(_CACHE_ATTR)
    return None if cached is None else cached[3]


def derived_from_fold(conv: nn.Conv2d, weight: torch.Tensor) -> dict | None:
    """The dict kept beside conv's cached fold while `weight` is that fold's weight (else None): a place for what is
    computed from the fold, dropped with it."""
    cached = conv.__dict__.get(_CACHE_ATTR)
    return cached[4] if cached is not None and cached[3][0] is weight else None


def kept_with_fold(conv: nn.Conv2d) -> dict | None:
    """The dict kept beside conv's cached fold, whichever its weight (None without a cached fold)."""
    cached = conv.__dict__.get(_CACHE_ATTR)
    return None if cached is None else cached[4]


def clear_fold_cache(conv: nn.Conv2d) -> None:
    conv.__dict__.pop(_CACHE_ATTR, None)


def clear_caches(model: nn.Module) -> None:
    """Drops the cached BN folds of every conv in `model` (the CPU backend's prepacked copies of them go with them):
    after writes that the caches cannot see (through `tensor.data`), or to release the memory they hold (a model
    moved to another device keeps its last folds, and the tensors they were made from, until its next call)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            clear_fold_cache(module)
